-- Only formcall writes formcall's state in public.forms (issue 14, finding 3).
--
-- The clinic's app owns patients and forms: it may insert and delete forms and set their
-- title, deadline and submitted_at (and patients.opted_out_at). The call state below is
-- formcall's: a clinic user who could set qstash_message_id could point their own form at
-- another patient's message and, by submitting, have formcall cancel it. The columns stay
-- where the contracts name them (forms.call_status, forms.vapi_call_id, ...); this trigger
-- refuses any change to them from a role that is not formcall's.
--
-- formcall is: service_role (the Supabase REST path; also any role granted it), and the
-- tables' owner or a superuser (the direct DATABASE_URL path, which connects as the owner).
-- The check is on current_user, the role the statement runs as: PostgREST switches to
-- `authenticated` or `anon` with SET ROLE, so a clinic request is never the owner even though
-- its login role (session_user, `authenticator`) may be a member of service_role. A SECURITY
-- DEFINER function owned by the owner runs as the owner: the clinic app must not ship one
-- that writes these columns.

create or replace function public.guard_formcall_state() returns trigger
language plpgsql
as $$
declare
  -- A guarded column that does not exist (yet) reads as null on both sides, so the list may
  -- name columns a later migration adds (call_outcome, next_call_at).
  guarded constant text[] := array[
    'call_status', 'call_attempts', 'called_at', 'vapi_call_id', 'last_call_error',
    'claimed_at', 'qstash_message_id', 'scheduled_deadline', 'call_outcome', 'next_call_at',
    'line_wait_at'];
  k text;
  fresh jsonb := to_jsonb(new);
  before jsonb := case when tg_op = 'UPDATE' then to_jsonb(old) end;
begin
  -- Inline, not a helper function: a trigger function runs as the writing role, which must
  -- not need EXECUTE on anything of formcall's.
  if pg_has_role(current_user, 'service_role', 'MEMBER')
     or exists (select 1 from pg_catalog.pg_roles r where r.rolname = current_user and r.rolsuper)
     or pg_has_role(current_user, (select c.relowner from pg_catalog.pg_class c
                                  where c.oid = tg_relid), 'MEMBER') then
    return new;
  end if;
  foreach k in array guarded loop
    if tg_op = 'UPDATE' and (fresh -> k) is distinct from (before -> k) then
      raise exception 'forms.% is written by formcall only', k
        using errcode = 'insufficient_privilege',
              hint = 'the clinic may set title, deadline and submitted_at';
    end if;
    -- A new form starts as formcall's defaults leave it.
    if tg_op = 'INSERT' and coalesce(fresh -> k, 'null'::jsonb) not in (
         'null'::jsonb,
         case k when 'call_status' then '"pending"'::jsonb
                when 'call_attempts' then '0'::jsonb else 'null'::jsonb end) then
      raise exception 'forms.% is written by formcall only', k
        using errcode = 'insufficient_privilege',
              hint = 'a new form starts pending, with no call state';
    end if;
  end loop;
  return new;
end
$$;

create trigger forms_guard_formcall_state before insert or update on public.forms
  for each row execute function public.guard_formcall_state();

-- Firing a trigger needs no EXECUTE; nobody calls this directly.
revoke execute on function public.guard_formcall_state() from public, anon, authenticated;
