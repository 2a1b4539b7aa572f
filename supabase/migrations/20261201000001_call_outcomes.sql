-- Call outcomes: every Vapi call is a row of `calls` (one call may cover several forms of one
-- patient, through `call_forms`), followed to its end by call-events; follow-up calls, the
-- per-patient caps of the FCC's healthcare exemption, and opt-out.
--
--   pending --claim (all the patient's due forms)--> calling --placed--> called (call_outcome null)
--      ^  ^                                            |                   | call ended (call-events
--      |  +--------released (no call placed)-----------+                   |  or the sweep's lookup)
--      |                                                                   v
--      +---- follow-up due: pending, next_call_at ---- no_answer/busy/voicemail/not_connected,
--                                                      fewer than MAX_CALLS_PER_FORM calls
--            called + final call_outcome <------------ reached, or the last allowed call
--            failed <------------------------------- bad_number
--            opted_out <---------------------------- the patient opted out (at any point)

alter table public.patients add column opted_out_at timestamptz;

alter table public.forms
  add column call_outcome text,
  add column next_call_at timestamptz,
  -- Since when the form waits for one of Vapi's lines (the line ledger): the oldest goes first.
  add column line_wait_at timestamptz,
  drop constraint forms_call_status_known,
  add constraint forms_call_status_known
    check (call_status in ('pending', 'calling', 'called', 'failed', 'opted_out')),
  add constraint forms_call_outcome_known
    check (call_outcome in ('reached', 'voicemail', 'no_answer', 'busy', 'not_connected',
                            'bad_number'));

-- One row per call formcall claims. It is inserted by the claim, before Vapi is asked, so the
-- caps count it from that instant (no race lets one more call through); it is deleted again when
-- no call was placed (released or rejected). vapi_call_id is set once Vapi answered.
--
-- It is also the line ledger: a call holds one of Vapi's lines from its claim until its end is
-- known (outcome set) or p_max_call_seconds pass (the longest a call can last), whichever is
-- first.
create table public.calls (
  id uuid primary key default gen_random_uuid(),
  patient_id uuid not null references public.patients (id) on delete cascade,
  vapi_call_id text unique,
  status text not null default 'queued'
    constraint calls_status_known
    check (status in ('queued', 'ringing', 'in-progress', 'forwarding', 'ended')),
  outcome text
    constraint calls_outcome_known
    check (outcome in ('reached', 'voicemail', 'no_answer', 'busy', 'not_connected', 'bad_number')),
  ended_reason text,
  started_at timestamptz,
  ended_at timestamptz,
  cost numeric,
  -- Where the end was learned: 'call-events' (Vapi's report) or 'lookup' (the sweep, GET /call).
  outcome_source text,
  placed_at timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);

create table public.call_forms (
  call_id uuid not null references public.calls (id) on delete cascade,
  form_id uuid not null references public.forms (id) on delete cascade,
  primary key (call_id, form_id)
);

create index call_forms_form_idx on public.call_forms (form_id);
-- The caps: a patient's calls of the last days.
create index calls_patient_created_idx on public.calls (patient_id, created_at);
-- Calls without an outcome yet: stale claims and lost reports, found by the sweep.
create index calls_open_idx on public.calls (created_at) where outcome is null;

create trigger calls_touch before update on public.calls
  for each row execute function public.touch_updated_at();

alter table public.calls enable row level security;
alter table public.call_forms enable row level security;
grant select, insert, update, delete on public.calls, public.call_forms to service_role;

-- A form is due at its deadline, or at its next call when one is scheduled (a follow-up, or a
-- patient over a cap), never before its deadline (a deadline moved later wins).
drop index public.forms_overdue_idx;
create index forms_overdue_idx on public.forms ((greatest(deadline, next_call_at)), id)
  where call_status = 'pending' and submitted_at is null and deadline is not null;

-- The patient's zone as PostgreSQL knows it, UTC when it does not (as formcall.window does).
create or replace function public.formcall_zone(p_timezone text)
returns text
language plpgsql
stable
as $$
begin
  if p_timezone is null or p_timezone !~ '^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$' then
    return 'UTC';
  end if;
  perform now() at time zone p_timezone;
  return p_timezone;
exception when others then
  return 'UTC';
end
$$;

-- The caps (47 CFR 64.1200(a)(9)(iv)): at most p_max_per_day calls in the patient's local
-- calendar day and p_max_per_week in any rolling 7 days. Given the patient's earlier calls,
-- the earliest moment at or after p_now a new call is allowed (p_now itself when it is).
-- Time only frees calls up (no call is ever in the future), so the later of the two rules'
-- moments satisfies both.
create or replace function public.patient_next_call_at(
  p_call_times timestamptz[], p_now timestamptz, p_timezone text,
  p_max_per_day int, p_max_per_week int
)
returns timestamptz
language plpgsql
stable
as $$
declare
  zone text := public.formcall_zone(p_timezone);
  today date := (p_now at time zone zone)::date;
  day_at timestamptz := p_now;
  week_at timestamptz := p_now;
  recent timestamptz[];
begin
  if (select count(*) from unnest(p_call_times) t
       where (t at time zone zone)::date = today) >= p_max_per_day then
    -- The first instant of the next local day (a midnight skipped by a clock change is read
    -- in the offset before it, which is that same instant).
    day_at := ((today + 1)::timestamp) at time zone zone;
  end if;
  recent := array(select t from unnest(p_call_times) t
                   where t > p_now - interval '7 days' order by t);
  if cardinality(recent) >= p_max_per_week then
    -- The oldest call that must leave the window before one more fits.
    week_at := recent[cardinality(recent) - p_max_per_week + 1] + interval '7 days';
  end if;
  return greatest(day_at, week_at);
end
$$;

drop function public.claim_form_call(uuid, int, jsonb);
drop function public.record_call_placed(uuid, text);
drop function public.release_form_call(uuid, text, boolean);
drop function public.record_call_failed(uuid, text);
drop function public.record_call_unknown(uuid, text);
drop function public.find_stale_calls(int, int);

-- The claim. The patient's row is locked first, so claims for any of a patient's forms run one
-- after the other: the caps, the opt-out and "one call per patient" are decided on committed
-- data, and exactly one of any number of concurrent deliveries claims. The call covers every
-- form of the patient that is due, in deadline order.
--
-- With p_lines (the line ledger) a claim also needs one of p_lines free lines: the ledger's
-- lock makes the count and the new call one step, so no race takes one line too many.
--
-- Answers: claimed (the call and its forms), capped (until when), no_line (retry_after: the
-- ledger's earliest expected release), skipped (reason; an opted-out patient's forms end
-- 'opted_out' and their messages are returned for cancelling; in_progress comes with the open
-- call, so a caller can reconcile a stale one), failed (attempts exhausted), not_found.
create or replace function public.lines_in_use(p_max_call_seconds int)
returns int
language sql
stable
as $$
  select count(*)::int from public.calls
   where outcome is null and created_at > now() - make_interval(secs => p_max_call_seconds)
$$;

create or replace function public.claim_form_call(
  p_form_id uuid,
  p_max_attempts int default 5,
  p_max_per_day int default 1,
  p_max_per_week int default 3,
  p_delivery jsonb default null,
  p_lines int default null,
  p_max_call_seconds int default 660
)
returns jsonb
language plpgsql
as $$
declare
  f public.forms;
  p public.patients;
  reason text;
  until timestamptz;
  call_id uuid;
  claimed jsonb;
  cancelled jsonb;
begin
  select * into p from public.patients
   where id = (select patient_id from public.forms where id = p_form_id)
     for update;
  if not found then
    return jsonb_build_object('outcome', 'not_found');
  end if;
  if p_delivery is not null then
    insert into public.form_call_events (form_id, event, detail)
      values (p_form_id, 'delivered', p_delivery);
  end if;
  select * into f from public.forms where id = p_form_id;

  reason := case
    when f.call_status = 'called' then 'already_called'
    when f.call_status = 'calling' then 'in_progress'
    when f.call_status = 'failed' then 'already_failed'
    when f.call_status = 'opted_out' then 'opted_out'
    when f.submitted_at is not null then 'submitted'
    when f.deadline is null then 'no_deadline'
    when greatest(f.deadline, f.next_call_at) > now() then 'not_due'
    when p.opted_out_at is not null then 'opted_out'
    when f.call_attempts >= p_max_attempts then 'attempts_exhausted'
  end;

  if reason = 'opted_out' and f.call_status = 'pending' then
    -- The clinic recorded the opt-out: end every waiting form of the patient.
    with ended as (
      update public.forms
         set call_status = 'opted_out', next_call_at = null, claimed_at = null,
             qstash_message_id = null, scheduled_deadline = null
       where patient_id = p.id and call_status = 'pending'
      returning id, (select qstash_message_id from public.forms o where o.id = forms.id) as message_id
    ), logged as (
      insert into public.form_call_events (form_id, event, detail)
        select id, 'opted_out', jsonb_build_object('opted_out_at', p.opted_out_at,
                                                   'message_id', message_id)
          from ended
    )
    select coalesce(jsonb_agg(jsonb_build_object('form_id', id, 'message_id', message_id))
                      filter (where message_id is not null), '[]'::jsonb)
      into cancelled from ended;
    return jsonb_build_object('outcome', 'skipped', 'reason', 'opted_out',
                              'cancel', cancelled);
  end if;

  if reason = 'attempts_exhausted' then
    update public.forms
       set call_status = 'failed',
           last_call_error = format('gave up after %s attempts; last error: %s',
                                    call_attempts, coalesce(last_call_error, 'none'))
     where id = f.id
    returning * into f;
    insert into public.form_call_events (form_id, event, detail)
      values (f.id, 'failed', jsonb_build_object('reason', f.last_call_error));
    return jsonb_build_object('outcome', 'failed', 'reason', f.last_call_error);
  end if;

  if reason is not null then
    insert into public.form_call_events (form_id, event, detail)
      values (f.id, 'skipped', jsonb_build_object('reason', reason));
    return jsonb_build_object(
      'outcome', 'skipped', 'reason', reason,
      'due_in_seconds', extract(epoch from greatest(f.deadline, f.next_call_at) - now()),
      'open_call', (select jsonb_build_object(
                      'call_id', c.id, 'claimed_at', c.created_at,
                      'placed', c.vapi_call_id is not null,
                      'unknown', coalesce(f.last_call_error like 'outcome unknown:%', false),
                      'form_ids', (select jsonb_agg(cf2.form_id order by f2.deadline, f2.id)
                                     from public.call_forms cf2
                                     join public.forms f2 on f2.id = cf2.form_id
                                    where cf2.call_id = c.id))
                      from public.calls c join public.call_forms cf on cf.call_id = c.id
                     where reason = 'in_progress' and cf.form_id = f.id and c.outcome is null
                     order by c.created_at desc limit 1));
  end if;

  -- The caps, over every call of the patient (any form); then one call at a time.
  until := public.patient_next_call_at(
    array(select c.created_at from public.calls c
           where c.patient_id = p.id and c.created_at > now() - interval '8 days'),
    now(), p.timezone, p_max_per_day, p_max_per_week);
  reason := case when until > now() then 'patient_cap' end;
  if reason is null and exists (select 1 from public.calls c
                                 where c.patient_id = p.id and c.outcome is null) then
    -- Another call to the patient has not ended (or its end is not known yet).
    until := now() + interval '2 minutes';
    reason := 'patient_in_call';
  end if;
  if reason is not null then
    with held as (
      update public.forms
         set next_call_at = until
       where patient_id = p.id and call_status = 'pending' and submitted_at is null
         and deadline is not null and greatest(deadline, next_call_at) <= now()
      returning id
    )
    insert into public.form_call_events (form_id, event, detail)
      select id, 'capped', jsonb_build_object('reason', reason, 'until', until) from held;
    return jsonb_build_object('outcome', 'capped', 'reason', reason, 'until', until,
                              'timezone', p.timezone);
  end if;

  if p_lines is not null then
    perform pg_advisory_xact_lock(72150102);  -- the ledger: one claim counts at a time
    if public.lines_in_use(p_max_call_seconds) >= p_lines then
      update public.forms set line_wait_at = now() where id = f.id and line_wait_at is null;
      if found then
        insert into public.form_call_events (form_id, event, detail)
          values (f.id, 'waiting_for_line', jsonb_build_object('lines', p_lines));
      end if;
      return jsonb_build_object(
        'outcome', 'no_line',
        'retry_after', (select greatest(1, ceil(extract(epoch from
                          min(created_at) + make_interval(secs => p_max_call_seconds) - now())))
                          from public.calls
                         where outcome is null
                           and created_at > now() - make_interval(secs => p_max_call_seconds)));
    end if;
  end if;

  insert into public.calls (patient_id) values (p.id) returning id into call_id;
  with taken as (
    update public.forms
       set call_status = 'calling', call_attempts = call_attempts + 1, claimed_at = now(),
           next_call_at = null, line_wait_at = null
     where patient_id = p.id and call_status = 'pending' and submitted_at is null
       and deadline is not null and greatest(deadline, next_call_at) <= now()
       and call_attempts < p_max_attempts
    returning *
  ), linked as (
    insert into public.call_forms (call_id, form_id) select call_id, id from taken
  ), logged as (
    insert into public.form_call_events (form_id, event, detail)
      select id, 'claimed', jsonb_build_object('attempt', call_attempts, 'call_id', call_id)
        from taken
  )
  select jsonb_agg(jsonb_build_object('id', id, 'title', title, 'deadline', deadline,
                                      'call_attempts', call_attempts)
                   order by deadline, id)
    into claimed from taken;
  return jsonb_build_object(
    'outcome', 'claimed', 'call_id', call_id, 'claimed_at', now(), 'forms', claimed,
    'patient', jsonb_build_object('id', p.id, 'name', p.full_name, 'phone', p.phone,
                                  'timezone', p.timezone));
end
$$;

-- Vapi accepted the call. A call row already placed under another Vapi id means a second call:
-- kept in the audit trail for a person to look at.
create or replace function public.record_call_placed(p_call_id uuid, p_vapi_call_id text,
                                                     p_status text default null)
returns jsonb
language plpgsql
as $$
declare
  c public.calls;
begin
  update public.calls
     set vapi_call_id = p_vapi_call_id, placed_at = coalesce(placed_at, now()),
         status = case when status = 'queued' and p_status in ('ringing', 'in-progress')
                       then p_status else status end
   where id = p_call_id and (vapi_call_id is null or vapi_call_id = p_vapi_call_id)
  returning * into c;
  if not found then
    insert into public.form_call_events (form_id, event, detail)
      select cf.form_id, 'extra_call',
             jsonb_build_object('call_id', p_call_id, 'vapi_call_id', p_vapi_call_id)
        from public.call_forms cf where cf.call_id = p_call_id;
    return jsonb_build_object('recorded', false);
  end if;
  with placed as (
    update public.forms f
       set call_status = 'called', called_at = now(), vapi_call_id = p_vapi_call_id,
           claimed_at = null, last_call_error = null, call_outcome = null,
           qstash_message_id = null, scheduled_deadline = null
      from public.call_forms cf
     where cf.call_id = c.id and f.id = cf.form_id and f.call_status = 'calling'
    returning f.id, f.call_attempts
  )
  insert into public.form_call_events (form_id, event, detail)
    select id, 'called', jsonb_build_object('call_id', c.id, 'vapi_call_id', p_vapi_call_id,
                                            'attempt', call_attempts)
      from placed;
  return jsonb_build_object('recorded', true);
end
$$;

-- No call was placed (a transient fault): the call row goes (the caps do not count it) and its
-- forms may be claimed again. Vapi's concurrency limit gives the attempt back: not the
-- patient's fault, and a busy hour must not exhaust a form's attempts.
create or replace function public.release_call(p_call_id uuid, p_error text,
                                               p_refund_attempt boolean default false)
returns jsonb
language plpgsql
as $$
declare
  released int;
begin
  with back as (
    update public.forms f
       set call_status = 'pending', claimed_at = null, last_call_error = p_error,
           call_attempts = case when p_refund_attempt then greatest(f.call_attempts - 1, 0)
                                else f.call_attempts end
      from public.call_forms cf
     where cf.call_id = p_call_id and f.id = cf.form_id and f.call_status = 'calling'
    returning f.id
  ), logged as (
    insert into public.form_call_events (form_id, event, detail)
      select id, 'released', jsonb_build_object('error', p_error, 'call_id', p_call_id,
                                                'attempt_refunded', p_refund_attempt)
        from back
  )
  select count(*) into released from back;
  delete from public.calls where id = p_call_id and vapi_call_id is null;
  return jsonb_build_object('released', released > 0);
end
$$;

-- Vapi refused the call for good (a 4xx): no call was placed; its forms are failed.
create or replace function public.record_call_failed(p_call_id uuid, p_error text)
returns jsonb
language plpgsql
as $$
declare
  failed int;
begin
  with gone as (
    update public.forms f
       set call_status = 'failed', claimed_at = null, last_call_error = p_error
      from public.call_forms cf
     where cf.call_id = p_call_id and f.id = cf.form_id and f.call_status = 'calling'
    returning f.id
  ), logged as (
    insert into public.form_call_events (form_id, event, detail)
      select id, 'failed', jsonb_build_object('error', p_error, 'call_id', p_call_id) from gone
  )
  select count(*) into failed from gone;
  delete from public.calls where id = p_call_id and vapi_call_id is null;
  return jsonb_build_object('recorded', failed > 0);
end
$$;

-- The request may have reached Vapi: the forms stay 'calling' (never claimable) and the call
-- row stays (the caps count it) until the sweep finds the call in Vapi's list or, after the
-- lease, confirms there is none.
create or replace function public.record_call_unknown(p_call_id uuid, p_error text)
returns jsonb
language plpgsql
as $$
declare
  marked int;
begin
  with unknown as (
    update public.forms f
       set last_call_error = 'outcome unknown: ' || p_error
      from public.call_forms cf
     where cf.call_id = p_call_id and f.id = cf.form_id and f.call_status = 'calling'
    returning f.id
  ), logged as (
    insert into public.form_call_events (form_id, event, detail)
      select id, 'outcome_unknown', jsonb_build_object('error', p_error, 'call_id', p_call_id)
        from unknown
  )
  select count(*) into marked from unknown;
  return jsonb_build_object('recorded', marked > 0);
end
$$;

-- What Vapi tells of a call (call-events), or what its record shows (the sweep's lookup).
-- Idempotent and order-independent: status only moves forward, the first end is the one kept,
-- an opt-out is applied whenever it is reported. A report for a call still 'calling' (it came
-- before formcall recorded the call as placed) is resolved through the call's form ids.
--
-- Answers: ignored (not a call formcall placed), or recorded with the follow-ups to publish
-- (forms back to pending, next_call_at, no message yet) and the messages to cancel (opt-out).
create or replace function public.record_call_event(
  p_vapi_call_id text,
  p_form_ids text[] default '{}',
  p_status text default null,
  p_ended_reason text default null,
  p_outcome text default null,
  p_started_at timestamptz default null,
  p_ended_at timestamptz default null,
  p_cost double precision default null,
  p_opt_out boolean default false,
  p_follow_up_on text[] default '{no_answer,busy,voicemail,not_connected}',
  p_max_calls_per_form int default 3,
  p_follow_up_delay_seconds int default 86400,
  p_source text default 'call-events'
)
returns jsonb
language plpgsql
as $$
declare
  c public.calls;
  p public.patients;
  progress constant text[] := array['queued', 'ringing', 'in-progress', 'forwarding', 'ended'];
  ended boolean := false;
  opted_out boolean := false;
  cancelled jsonb := '[]'::jsonb;
  follow_ups jsonb;
begin
  -- The same lock order as the claim: patient, then call, then forms.
  select * into p from public.patients
   where id = coalesce(
     (select patient_id from public.calls where vapi_call_id = p_vapi_call_id),
     (select c2.patient_id from public.calls c2 join public.call_forms cf on cf.call_id = c2.id
       where cf.form_id = p_form_ids[1]::uuid and c2.vapi_call_id is null
       order by c2.created_at desc limit 1))
     for update;
  if not found then
    return jsonb_build_object('status', 'ignored', 'reason', 'unknown call');
  end if;
  select * into c from public.calls where vapi_call_id = p_vapi_call_id for update;
  if not found then
    select c2.* into c from public.calls c2 join public.call_forms cf on cf.call_id = c2.id
     where cf.form_id = p_form_ids[1]::uuid and c2.vapi_call_id is null
     order by c2.created_at desc limit 1
       for update of c2;
    if not found then
      return jsonb_build_object('status', 'ignored', 'reason', 'unknown call');
    end if;
    perform public.record_call_placed(c.id, p_vapi_call_id);
    select * into c from public.calls where id = c.id;
  end if;

  if p_status = any(progress)
     and array_position(progress, p_status) > array_position(progress, c.status) then
    update public.calls set status = p_status where id = c.id returning * into c;
  end if;
  update public.calls
     set started_at = coalesce(started_at, p_started_at), cost = coalesce(p_cost, cost)
   where id = c.id returning * into c;

  if p_outcome is not null and c.outcome is null then
    ended := true;
    update public.calls
       set status = 'ended', outcome = p_outcome, ended_reason = p_ended_reason,
           ended_at = coalesce(p_ended_at, now()), outcome_source = p_source
     where id = c.id
    returning * into c;
    -- Each form of the call: follow-up, done, or failed for a bad number.
    with placed as (
      select cf.form_id,
             (select count(*) from public.call_forms cf2 join public.calls c2 on c2.id = cf2.call_id
               where cf2.form_id = cf.form_id and c2.vapi_call_id is not null) as calls_placed
        from public.call_forms cf where cf.call_id = c.id
    ), decided as (
      update public.forms f
         set call_outcome = p_outcome,
             call_status = case
               when f.submitted_at is null and p_outcome = 'bad_number' then 'failed'
               when f.submitted_at is null and p_outcome = any(p_follow_up_on)
                    and pl.calls_placed < p_max_calls_per_form then 'pending'
               else 'called' end,
             next_call_at = case
               when f.submitted_at is null and p_outcome <> 'bad_number'
                    and p_outcome = any(p_follow_up_on) and pl.calls_placed < p_max_calls_per_form
               then c.ended_at + make_interval(secs => p_follow_up_delay_seconds) end,
             call_attempts = case when f.submitted_at is null and p_outcome = any(p_follow_up_on)
                                   and pl.calls_placed < p_max_calls_per_form
                                  then 0 else f.call_attempts end,
             last_call_error = case when f.submitted_at is null and p_outcome = 'bad_number'
                                    then 'bad number: ' || coalesce(p_ended_reason, 'unknown')
                                    else f.last_call_error end
        from placed pl
       where f.id = pl.form_id and f.call_status = 'called' and f.vapi_call_id = c.vapi_call_id
      returning f.id, f.call_status, f.next_call_at, pl.calls_placed
    )
    insert into public.form_call_events (form_id, event, detail)
      select id, e.event, e.detail
        from decided d,
             lateral (values
               ('call_ended', jsonb_build_object('call_id', c.id, 'vapi_call_id', c.vapi_call_id,
                                                 'outcome', p_outcome,
                                                 'ended_reason', p_ended_reason,
                                                 'calls_placed', d.calls_placed,
                                                 'source', p_source)),
               (case d.call_status when 'pending' then 'follow_up_scheduled'
                                   when 'failed' then 'failed' end,
                case d.call_status
                  when 'pending' then jsonb_build_object('next_call_at', d.next_call_at,
                                                         'calls_placed', d.calls_placed)
                  when 'failed' then jsonb_build_object('error', 'bad number',
                                                        'ended_reason', p_ended_reason) end)
             ) as e(event, detail)
       where e.event is not null;
  end if;

  if p_opt_out and p.opted_out_at is null then
    opted_out := true;
    update public.patients set opted_out_at = now() where id = p.id;
    with stopped as (
      update public.forms
         set call_status = 'opted_out', next_call_at = null, claimed_at = null,
             qstash_message_id = null, scheduled_deadline = null
       where patient_id = p.id and call_status in ('pending', 'called')
         and (call_status = 'pending' or (vapi_call_id = c.vapi_call_id and submitted_at is null))
      returning id, (select qstash_message_id from public.forms o where o.id = forms.id) as message_id
    ), logged as (
      insert into public.form_call_events (form_id, event, detail)
        select id, 'opted_out', jsonb_build_object('call_id', c.id, 'message_id', message_id)
          from stopped
    )
    select coalesce(jsonb_agg(jsonb_build_object('form_id', id, 'message_id', message_id))
                      filter (where message_id is not null), '[]'::jsonb)
      into cancelled from stopped;
  end if;

  -- Follow-ups of this call still without a message: on a repeated report too, so a publish
  -- that failed after the first report is made good by Vapi's retry.
  select coalesce(jsonb_agg(jsonb_build_object('form_id', f.id, 'next_call_at',
                                               greatest(f.deadline, f.next_call_at),
                                               'timezone', p.timezone)), '[]'::jsonb)
    into follow_ups
    from public.forms f join public.call_forms cf on cf.form_id = f.id and cf.call_id = c.id
   where f.call_status = 'pending' and f.next_call_at is not null and f.qstash_message_id is null
     and f.submitted_at is null;

  return jsonb_build_object('status', 'recorded', 'call_id', c.id, 'ended', ended,
                            'duplicate', p_outcome is not null and not ended,
                            'outcome', c.outcome, 'follow_ups', follow_ups,
                            'opted_out', opted_out, 'cancel', cancelled);
end
$$;

-- Forms waiting for a line, oldest first, as many as lines are free now: a freed line starts
-- the next waiting form at once (its caller publishes their messages).
create or replace function public.forms_waiting_for_line(p_lines int, p_max_call_seconds int)
returns jsonb
language sql
stable
as $$
  select coalesce(jsonb_agg(w.id order by w.line_wait_at, w.id), '[]'::jsonb)
    from (
      select f.id, f.line_wait_at
        from public.forms f
       where f.line_wait_at is not null and f.call_status = 'pending'
         and f.submitted_at is null and greatest(f.deadline, f.next_call_at) <= now()
       order by f.line_wait_at, f.id
       limit greatest(p_lines - public.lines_in_use(p_max_call_seconds), 0)
    ) w
$$;

create index forms_line_wait_idx on public.forms (line_wait_at, id)
  where line_wait_at is not null and call_status = 'pending';

-- QStash gave up on a call-form message. As before (20261129000003), but a form waiting for a
-- line is not failed: its turn comes when a line frees (and the sweep is the safety net).
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
  if f.call_status = 'pending' and f.line_wait_at is null then
    update public.forms
       set call_status = 'failed', claimed_at = null, last_call_error = p_reason
     where id = f.id;
    insert into public.form_call_events (form_id, event, detail)
      values (f.id, 'failed', p_detail || jsonb_build_object('error', p_reason));
    return jsonb_build_object('outcome', 'failed');
  end if;
  insert into public.form_call_events (form_id, event, detail)
    values (f.id, 'delivery_failed', p_detail || jsonb_build_object(
      'error', p_reason, 'waiting_for_line', f.line_wait_at is not null));
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
           'next_call_at', f.next_call_at, 'due_at', greatest(f.deadline, f.next_call_at),
           'due', f.deadline is not null and greatest(f.deadline, f.next_call_at) <= now(),
           'opted_out', p.opted_out_at is not null)
    from public.forms f join public.patients p on p.id = f.patient_id
   where f.id = p_form_id
$$;

-- Keyset pages of due forms (deadlines and follow-ups), with each patient's time zone.
create or replace function public.find_overdue_forms(
  p_limit int default 100,
  p_after_deadline timestamptz default null,
  p_after_id uuid default null
)
returns jsonb
language sql
stable
as $$
  -- Keyset pages over forms_overdue_idx: (due, id) after the last row of the previous page.
  select coalesce(jsonb_agg(jsonb_build_object('id', o.id, 'deadline', o.due,
                                               'timezone', p.timezone)
                            order by o.due, o.id), '[]'::jsonb)
    from (
      select f.id, greatest(f.deadline, f.next_call_at) as due, f.patient_id
        from public.forms f
       where f.call_status = 'pending'
         and f.submitted_at is null
         and f.deadline is not null
         and greatest(f.deadline, f.next_call_at) <= now()
         and (p_after_deadline is null
              or (greatest(f.deadline, f.next_call_at), f.id) > (p_after_deadline, p_after_id))
       order by greatest(f.deadline, f.next_call_at), f.id
       limit p_limit
    ) o
    join public.patients p on p.id = o.patient_id
$$;

-- Claims whose Vapi answer was never recorded (unknown outcome, or the claimant died).
create or replace function public.find_stale_calls(p_lease_seconds int, p_limit int default 100)
returns jsonb
language sql
stable
as $$
  select coalesce(jsonb_agg(jsonb_build_object('call_id', s.id, 'claimed_at', s.created_at,
                                               'form_ids', s.form_ids)
                            order by s.created_at), '[]'::jsonb)
    from (
      select c.id, c.created_at,
             (select jsonb_agg(cf.form_id order by f.deadline, f.id)
                from public.call_forms cf join public.forms f on f.id = cf.form_id
               where cf.call_id = c.id) as form_ids
        from public.calls c
       where c.outcome is null and c.vapi_call_id is null
         and c.created_at < now() - make_interval(secs => p_lease_seconds)
       order by c.created_at
       limit p_limit
    ) s
$$;

-- Placed calls whose end was never reported (a lost report): the sweep asks Vapi.
create or replace function public.find_calls_awaiting_outcome(p_timeout_seconds int,
                                                              p_limit int default 100)
returns jsonb
language sql
stable
as $$
  select coalesce(jsonb_agg(jsonb_build_object('call_id', s.id, 'vapi_call_id', s.vapi_call_id,
                                               'placed_at', s.placed_at)
                            order by s.created_at), '[]'::jsonb)
    from (
      select c.id, c.vapi_call_id, c.placed_at, c.created_at
        from public.calls c
       where c.outcome is null and c.vapi_call_id is not null
         and coalesce(c.placed_at, c.created_at) < now() - make_interval(secs => p_timeout_seconds)
       order by c.created_at
       limit p_limit
    ) s
$$;

do $$
declare
  fn text;
begin
  foreach fn in array array[
    'formcall_zone(text)',
    'patient_next_call_at(timestamptz[], timestamptz, text, int, int)',
    'claim_form_call(uuid, int, int, int, jsonb, int, int)', 'lines_in_use(int)',
    'forms_waiting_for_line(int, int)',
    'record_call_placed(uuid, text, text)', 'release_call(uuid, text, boolean)',
    'record_call_failed(uuid, text)', 'record_call_unknown(uuid, text)',
    'record_call_event(text, text[], text, text, text, timestamptz, timestamptz, double precision, boolean, text[], int, int, text)',
    'find_stale_calls(int, int)', 'find_calls_awaiting_outcome(int, int)'
  ] loop
    execute format('revoke execute on function public.%s from public, anon, authenticated', fn);
    execute format('grant execute on function public.%s to service_role', fn);
  end loop;
end
$$;
