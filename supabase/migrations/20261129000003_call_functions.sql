-- The call state machine. Each function is one transaction: the state change and its audit
-- row commit together. Both data paths (Supabase RPC and direct Postgres) call these.
--
--   pending --claim--> calling --placed--> called
--      ^                  |  \--failed--> failed
--      +----released------+   \--unknown (stays calling; the sweep reconciles after the lease)

create or replace function public.claim_form_call(p_form_id uuid, p_max_attempts int default 5)
returns jsonb
language plpgsql
as $$
declare
  f public.forms;
  p public.patients;
  reason text;
begin
  -- The atomic gate: of any number of concurrent deliveries, exactly one updates the row.
  -- Under READ COMMITTED a waiting update re-checks the WHERE clause on the committed row.
  update public.forms
     set call_status = 'calling', call_attempts = call_attempts + 1, claimed_at = now()
   where id = p_form_id
     and call_status = 'pending'
     and submitted_at is null
     and deadline is not null
     and deadline <= now()
     and call_attempts < p_max_attempts
  returning * into f;

  if found then
    select * into p from public.patients where id = f.patient_id;
    insert into public.form_call_events (form_id, event, detail)
      values (f.id, 'claimed', jsonb_build_object('attempt', f.call_attempts));
    return jsonb_build_object(
      'outcome', 'claimed',
      'form', jsonb_build_object(
        'id', f.id, 'title', f.title, 'deadline', f.deadline,
        'call_attempts', f.call_attempts, 'claimed_at', f.claimed_at,
        'patient_name', p.full_name, 'phone', p.phone, 'timezone', p.timezone));
  end if;

  select * into f from public.forms where id = p_form_id;
  if not found then
    return jsonb_build_object('outcome', 'not_found');
  end if;

  reason := case
    when f.call_status = 'called' then 'already_called'
    when f.call_status = 'calling' then 'in_progress'
    when f.call_status = 'failed' then 'already_failed'
    when f.submitted_at is not null then 'submitted'
    when f.deadline is null then 'no_deadline'
    when f.deadline > now() then 'not_due'
    else 'attempts_exhausted'
  end;

  if reason = 'attempts_exhausted' then
    update public.forms
       set call_status = 'failed',
           last_call_error = format('gave up after %s attempts; last error: %s',
                                    call_attempts, coalesce(last_call_error, 'none'))
     where id = p_form_id and call_status = 'pending'
    returning * into f;
    if found then
      insert into public.form_call_events (form_id, event, detail)
        values (f.id, 'failed', jsonb_build_object('reason', f.last_call_error));
      return jsonb_build_object('outcome', 'failed', 'reason', f.last_call_error);
    end if;
    return public.claim_form_call(p_form_id, p_max_attempts);
  end if;

  insert into public.form_call_events (form_id, event, detail)
    values (f.id, 'skipped', jsonb_build_object('reason', reason));
  return jsonb_build_object('outcome', 'skipped', 'reason', reason,
                            'due_in_seconds', extract(epoch from f.deadline - now()));
end
$$;

create or replace function public.record_call_placed(p_form_id uuid, p_call_id text)
returns jsonb
language plpgsql
as $$
declare
  f public.forms;
begin
  -- A placed call is the truth whatever the row says (it is never un-called); a second call
  -- id for a form already called is kept in the audit trail for a person to look at.
  update public.forms
     set call_status = 'called', called_at = now(), vapi_call_id = p_call_id,
         claimed_at = null, last_call_error = null
   where id = p_form_id and call_status <> 'called'
  returning * into f;
  if found then
    insert into public.form_call_events (form_id, event, detail)
      values (f.id, 'called', jsonb_build_object('call_id', p_call_id, 'attempt', f.call_attempts));
    return jsonb_build_object('recorded', true);
  end if;
  select * into f from public.forms where id = p_form_id;
  if found and f.vapi_call_id is distinct from p_call_id then
    insert into public.form_call_events (form_id, event, detail)
      values (f.id, 'extra_call', jsonb_build_object('call_id', p_call_id,
                                                     'recorded_call_id', f.vapi_call_id));
  end if;
  return jsonb_build_object('recorded', false);
end
$$;

create or replace function public.release_form_call(p_form_id uuid, p_error text)
returns jsonb
language plpgsql
as $$
declare
  f public.forms;
begin
  -- No call was placed (transient fault): the form may be claimed again by a retry.
  update public.forms
     set call_status = 'pending', claimed_at = null, last_call_error = p_error
   where id = p_form_id and call_status = 'calling'
  returning * into f;
  if found then
    insert into public.form_call_events (form_id, event, detail)
      values (f.id, 'released', jsonb_build_object('error', p_error));
  end if;
  return jsonb_build_object('released', found);
end
$$;

create or replace function public.record_call_failed(p_form_id uuid, p_error text)
returns jsonb
language plpgsql
as $$
declare
  f public.forms;
begin
  update public.forms
     set call_status = 'failed', claimed_at = null, last_call_error = p_error
   where id = p_form_id and call_status in ('pending', 'calling')
  returning * into f;
  if found then
    insert into public.form_call_events (form_id, event, detail)
      values (f.id, 'failed', jsonb_build_object('error', p_error));
  end if;
  return jsonb_build_object('recorded', found);
end
$$;

create or replace function public.record_call_unknown(p_form_id uuid, p_error text)
returns jsonb
language plpgsql
as $$
declare
  f public.forms;
begin
  -- The request may have reached Vapi: the form stays 'calling' (never claimable) until the
  -- sweep finds the call in Vapi's list or, after the lease, confirms there is none.
  update public.forms
     set last_call_error = 'outcome unknown: ' || p_error
   where id = p_form_id and call_status = 'calling'
  returning * into f;
  if found then
    insert into public.form_call_events (form_id, event, detail)
      values (f.id, 'outcome_unknown', jsonb_build_object('error', p_error));
  end if;
  return jsonb_build_object('recorded', found);
end
$$;

create or replace function public.find_overdue_forms(
  p_limit int default 100,
  p_after_deadline timestamptz default null,
  p_after_id uuid default null
)
returns jsonb
language sql
stable
as $$
  -- Keyset pages over forms_overdue_idx: (deadline, id) after the last row of the previous page.
  select coalesce(jsonb_agg(jsonb_build_object('id', o.id, 'deadline', o.deadline)
                            order by o.deadline, o.id), '[]'::jsonb)
    from (
      select f.id, f.deadline
        from public.forms f
       where f.call_status = 'pending'
         and f.submitted_at is null
         and f.deadline is not null
         and f.deadline <= now()
         and (p_after_deadline is null or (f.deadline, f.id) > (p_after_deadline, p_after_id))
       order by f.deadline, f.id
       limit p_limit
    ) o
$$;

create or replace function public.find_stale_calls(p_lease_seconds int, p_limit int default 100)
returns jsonb
language sql
stable
as $$
  select coalesce(jsonb_agg(jsonb_build_object('id', s.id, 'claimed_at', s.claimed_at,
                                               'call_attempts', s.call_attempts)
                            order by s.claimed_at), '[]'::jsonb)
    from (
      select f.id, f.claimed_at, f.call_attempts
        from public.forms f
       where f.call_status = 'calling'
         and f.claimed_at < now() - make_interval(secs => p_lease_seconds)
       order by f.claimed_at
       limit p_limit
    ) s
$$;

-- Only the service role (the backend) may run the state machine; Supabase grants EXECUTE on
-- new functions to anon and authenticated by default, so take it back explicitly.
do $$
declare
  fn text;
begin
  foreach fn in array array[
    'claim_form_call(uuid, int)', 'record_call_placed(uuid, text)',
    'release_form_call(uuid, text)', 'record_call_failed(uuid, text)',
    'record_call_unknown(uuid, text)', 'find_overdue_forms(int, timestamptz, uuid)',
    'find_stale_calls(int, int)'
  ] loop
    execute format('revoke execute on function public.%s from public, anon, authenticated', fn);
    execute format('grant execute on function public.%s to service_role', fn);
  end loop;
end
$$;
