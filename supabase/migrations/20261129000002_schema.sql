-- Patients, their forms, and the audit trail of every form's call.

create table public.patients (
  id uuid primary key default gen_random_uuid(),
  full_name text not null,
  phone text not null constraint patients_phone_e164 check (phone ~ '^\+[1-9][0-9]{1,14}$'),
  timezone text not null default 'UTC',
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);

create table public.forms (
  id uuid primary key default gen_random_uuid(),
  patient_id uuid not null references public.patients (id) on delete cascade,
  title text not null,
  deadline timestamptz,
  submitted_at timestamptz,
  call_status text not null default 'pending'
    constraint forms_call_status_known check (call_status in ('pending', 'calling', 'called', 'failed')),
  call_attempts int not null default 0 constraint forms_call_attempts_nonnegative check (call_attempts >= 0),
  called_at timestamptz,
  vapi_call_id text,
  last_call_error text,
  -- When the current claim was taken: a 'calling' row older than the lease is reconciled by the sweep.
  claimed_at timestamptz,
  -- The one-time QStash message that will deliver this form's deadline (schedule-form keeps it
  -- current), and the deadline it was published for.
  qstash_message_id text,
  scheduled_deadline timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint forms_called_has_call check (call_status <> 'called' or vapi_call_id is not null)
);

create index forms_patient_id_idx on public.forms (patient_id);

-- The sweep's index: only rows that are still waiting for a call are in it, so the overdue
-- query reads the overdue rows and nothing else, however large the table grows.
create index forms_overdue_idx on public.forms (deadline, id)
  where call_status = 'pending' and submitted_at is null and deadline is not null;

-- Claims whose outcome is not yet recorded (reconciled by the sweep once stale).
create index forms_calling_idx on public.forms (claimed_at) where call_status = 'calling';

create table public.form_call_events (
  id bigint generated always as identity primary key,
  form_id uuid not null references public.forms (id) on delete cascade,
  event text not null,
  detail jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default clock_timestamp()
);

create index form_call_events_form_idx on public.form_call_events (form_id, id);

create or replace function public.touch_updated_at() returns trigger
language plpgsql as $$
begin
  new.updated_at := now();
  return new;
end
$$;

create trigger patients_touch before update on public.patients
  for each row execute function public.touch_updated_at();
create trigger forms_touch before update on public.forms
  for each row execute function public.touch_updated_at();

-- Row-level security: no policies, so only the service role (which bypasses RLS) and the
-- table owner can read or write. The clinic app's own policies belong with the app.
alter table public.patients enable row level security;
alter table public.forms enable row level security;
alter table public.form_call_events enable row level security;

grant usage on schema public to service_role;
grant select, insert, update, delete on public.patients, public.forms, public.form_call_events
  to service_role;
