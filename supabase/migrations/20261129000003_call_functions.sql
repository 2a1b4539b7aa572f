-- The call state machine. Each function is one transaction: the state change and its audit
-- row commit together. Both data paths (Supabase RPC and direct Postgres) call these.
--
--   pending --claim--> calling --placed--> called
--      ^                  |  \--failed--> failed <-- QStash gave up (failure callback)
--      +----released------+   \--unknown (stays calling; the sweep reconciles after the lease)
--
-- Scheduling (schedule-form) keeps forms.qstash_message_id pointing at the form's one-time
-- message; every transition writes a form_call_events row in the same transaction.

-- Each delivery is recorded as it arrives ('delivered', with the QStash message id and retry).
create or replace function public.claim_form_call(p_form_id uuid, p_max_attempts int default 5,
                                                  p_delivery jsonb default null)
returns jsonb
language plpgsql
as $$
declare
  f public.forms;
  p public.patients;
  reason text;
begin
  if p_delivery is not null then
    insert into public.form_call_events (form_id, event, detail)
      select id, 'delivered', p_delivery from public.forms where id = p_form_id;
  end if;

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

-- No call was placed (transient fault): the form may be claimed again by a retry. A release
-- may give the attempt back (Vapi's concurrency limit: the call was never placed and it is not
-- the patient's fault), so a busy hour cannot exhaust a form's attempts.
create or replace function public.release_form_call(p_form_id uuid, p_error text,
                                                    p_refund_attempt boolean default false)
returns jsonb
language plpgsql
as $$
declare
  f public.forms;
begin
  update public.forms
     set call_status = 'pending', claimed_at = null, last_call_error = p_error,
         call_attempts = case when p_refund_attempt then greatest(call_attempts - 1, 0)
                              else call_attempts end
   where id = p_form_id and call_status = 'calling'
  returning * into f;
  if found then
    insert into public.form_call_events (form_id, event, detail)
      values (f.id, 'released', jsonb_build_object('error', p_error,
                                                   'attempt_refunded', p_refund_attempt));
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

create or replace function public.record_call_deferred(p_form_id uuid, p_until timestamptz,
                                                       p_message_id text)
returns jsonb
language plpgsql
as $$
declare
  f public.forms;
begin
  update public.forms
     set qstash_message_id = coalesce(p_message_id, qstash_message_id)
   where id = p_form_id and call_status = 'pending'
  returning * into f;
  if found then
    insert into public.form_call_events (form_id, event, detail)
      values (f.id, 'deferred', jsonb_build_object('until', p_until, 'message_id', p_message_id));
  end if;
  return jsonb_build_object('recorded', found);
end
$$;

-- QStash gave up on a call-form message. A pending form is failed with the reason; a form
-- whose call outcome is unknown stays 'calling' for the sweep to reconcile; a called or failed
-- form keeps its state. Each source message is recorded once, so a repeated callback changes
-- nothing.
create or replace function public.record_delivery_failed(p_form_id uuid, p_reason text,
                                                         p_detail jsonb)
returns jsonb
language plpgsql
as $$
declare
  f public.forms;
begin
  select * into f from public.forms where id = p_form_id for update;
  if not found then
    return jsonb_build_object('outcome', 'not_found');
  end if;
  if exists (select 1 from public.form_call_events e
              where e.form_id = f.id and e.event in ('failed', 'delivery_failed')
                and e.detail->>'source_message_id' = p_detail->>'source_message_id') then
    return jsonb_build_object('outcome', f.call_status, 'duplicate', true);
  end if;
  if f.call_status = 'pending' then
    update public.forms
       set call_status = 'failed', claimed_at = null, last_call_error = p_reason
     where id = f.id;
    insert into public.form_call_events (form_id, event, detail)
      values (f.id, 'failed', p_detail || jsonb_build_object('error', p_reason));
    return jsonb_build_object('outcome', 'failed');
  end if;
  insert into public.form_call_events (form_id, event, detail)
    values (f.id, 'delivery_failed', p_detail || jsonb_build_object('error', p_reason));
  return jsonb_build_object('outcome', f.call_status);
end
$$;

-- What scheduling and the calling window need to know about a form, in one read.
create or replace function public.form_schedule_state(p_form_id uuid)
returns jsonb
language sql
stable
as $$
  select jsonb_build_object(
           'id', f.id, 'deadline', f.deadline, 'submitted', f.submitted_at is not null,
           'call_status', f.call_status, 'qstash_message_id', f.qstash_message_id,
           'scheduled_deadline', f.scheduled_deadline, 'timezone', p.timezone,
           'due', f.deadline is not null and f.deadline <= now())
    from public.forms f join public.patients p on p.id = f.patient_id
   where f.id = p_form_id
$$;

create or replace function public.record_form_scheduled(
  p_form_id uuid, p_message_id text, p_deadline timestamptz, p_not_before timestamptz
)
returns jsonb
language plpgsql
as $$
declare
  f public.forms;
  previous text;
begin
  select qstash_message_id into previous from public.forms where id = p_form_id for update;
  update public.forms
     set qstash_message_id = p_message_id, scheduled_deadline = p_deadline
   where id = p_form_id
  returning * into f;
  if not found then
    return jsonb_build_object('recorded', false);
  end if;
  insert into public.form_call_events (form_id, event, detail)
    values (f.id, case when previous is null then 'scheduled' else 'rescheduled' end,
            jsonb_build_object('message_id', p_message_id, 'deadline', p_deadline,
                               'not_before', p_not_before, 'previous_message_id', previous));
  return jsonb_build_object('recorded', true);
end
$$;

create or replace function public.record_form_unscheduled(p_form_id uuid, p_message_id text,
                                                          p_reason text)
returns jsonb
language plpgsql
as $$
declare
  f public.forms;
begin
  update public.forms
     set qstash_message_id = null, scheduled_deadline = null
   where id = p_form_id and qstash_message_id is not distinct from p_message_id
  returning * into f;
  if found then
    insert into public.form_call_events (form_id, event, detail)
      values (f.id, 'cancelled', jsonb_build_object('message_id', p_message_id,
                                                    'reason', p_reason));
  end if;
  return jsonb_build_object('recorded', found);
end
$$;

-- Keyset pages of overdue forms, with each patient's time zone (the sweep enqueues forms
-- outside their calling window for its opening).
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
  select coalesce(jsonb_agg(jsonb_build_object('id', o.id, 'deadline', o.deadline,
                                               'timezone', p.timezone)
                            order by o.deadline, o.id), '[]'::jsonb)
    from (
      select f.id, f.deadline, f.patient_id
        from public.forms f
       where f.call_status = 'pending'
         and f.submitted_at is null
         and f.deadline is not null
         and f.deadline <= now()
         and (p_after_deadline is null or (f.deadline, f.id) > (p_after_deadline, p_after_id))
       order by f.deadline, f.id
       limit p_limit
    ) o
    join public.patients p on p.id = o.patient_id
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
    'claim_form_call(uuid, int, jsonb)', 'record_call_placed(uuid, text)',
    'release_form_call(uuid, text, boolean)', 'record_call_failed(uuid, text)',
    'record_call_unknown(uuid, text)', 'record_call_deferred(uuid, timestamptz, text)',
    'record_delivery_failed(uuid, text, jsonb)', 'form_schedule_state(uuid)',
    'record_form_scheduled(uuid, text, timestamptz, timestamptz)',
    'record_form_unscheduled(uuid, text, text)', 'find_overdue_forms(int, timestamptz, uuid)',
    'find_stale_calls(int, int)'
  ] loop
    execute format('revoke execute on function public.%s from public, anon, authenticated', fn);
    execute format('grant execute on function public.%s to service_role', fn);
  end loop;
end
$$;
