-- Every formcall SQL function runs with a fixed search_path, and no function created later is
-- executable by anon or authenticated unless granted on purpose (issue 14, finding 8).
--
-- Without a fixed search_path a function resolves names through the caller's: a role that can
-- create objects in a schema earlier on the path (or a temporary table: pg_temp is searched
-- first unless named) could shadow public.forms. Named last, pg_temp is searched last. This
-- migration runs after the others and sets it on every function in public (extension members
-- excluded: their extension owns them); a later migration sets it on its own functions, and
-- tests/integration/test_sql_hygiene.py fails for any function without it.
do $$
declare
  fn regprocedure;
begin
  for fn in
    select p.oid::regprocedure
      from pg_catalog.pg_proc p
      join pg_catalog.pg_namespace n on n.oid = p.pronamespace
     where n.nspname = 'public'
       and p.prokind in ('f', 'p')
       and not exists (select 1 from pg_catalog.pg_depend d
                        where d.classid = 'pg_catalog.pg_proc'::regclass and d.objid = p.oid
                          and d.deptype = 'e')
  loop
    execute format('alter function %s set search_path = pg_catalog, public, pg_temp', fn);
  end loop;
end
$$;

-- PostgreSQL grants EXECUTE on every new function to PUBLIC, and Supabase adds anon and
-- authenticated in public; take both back for functions the migration role creates from now
-- on, so a forgotten REVOKE never exposes a state-machine function through the REST API.
-- The PUBLIC default is global (it cannot be taken back per schema): a function the clinic's
-- app later creates as this role for its users needs its own GRANT, as it should anyway.
alter default privileges revoke execute on functions from public;
alter default privileges in schema public revoke execute on functions from public, anon, authenticated;
alter default privileges in schema public grant execute on functions to service_role;

-- And for the functions already here (trigger functions included: firing a trigger needs no
-- EXECUTE), only the service role keeps EXECUTE: the clinic's roles call none of formcall's.
revoke execute on all functions in schema public from public, anon, authenticated;
