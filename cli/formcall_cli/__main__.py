"""`python -m formcall_cli`: the `formcall` command."""

from formcall_cli.main import main

main()
