-- The local QStash's whole state. {schema} is replaced by the schema name (checked to be a plain identifier).

create schema if not exists {schema};

-- Messages waiting for delivery, being delivered, or waiting for a retry. A delivered,
-- failed or cancelled message leaves this table (to the DLQ, or nowhere), as on QStash.
create table if not exists {schema}.messages (
  message_id text primary key,
  url text not null,
  method text not null,
  body bytea not null,
  content_type text,
  -- Forwarded headers, prefix stripped: name -> list of values.
  header jsonb not null default '{}',
  max_retries int not null,
  retry_delay text,
  timeout_s double precision,
  -- {"url", "header", "method", "retries", "timeout_s", "retry_delay"} or null.
  callback jsonb,
  failure_callback jsonb,
  flow_key text,
  flow_parallelism int,
  flow_rate int,
  flow_period_s int,
  label text,
  schedule_id text,
  caller_ip text,
  created_at timestamptz not null,
  not_before timestamptz not null,
  -- Failed attempts so far: the Upstash-Retried value of the next attempt.
  retried int not null default 0,
  -- CREATED or RETRY while waiting, ACTIVE while a dispatcher holds it.
  state text not null,
  -- When the next attempt is due; while ACTIVE, when the dispatcher's lease runs out, so a
  -- delivery lost with a crashed server becomes due again by itself.
  due_at timestamptz not null,
  owner text
);

create index if not exists messages_due_at_idx on {schema}.messages (due_at);
create index if not exists messages_owner_idx on {schema}.messages (owner) where owner is not null;

-- Deduplication ids and content hashes seen in the last 10 minutes (older rows are reused).
create table if not exists {schema}.dedup (
  dedup_key text primary key,
  message_id text not null,
  created_at timestamptz not null
);

create sequence if not exists {schema}.dlq_seq;

-- Messages whose retries ran out. `message` is the API representation at the time of failure.
create table if not exists {schema}.dlq (
  seq bigint primary key default nextval('{schema}.dlq_seq'),
  dlq_id text not null unique,
  message_id text not null,
  url text not null,
  schedule_id text,
  label text,
  response_status int not null,
  message jsonb not null,
  failed_at timestamptz not null default now()
);

create table if not exists {schema}.schedules (
  schedule_id text primary key,
  destination text not null,
  -- As given, including any CRON_TZ= prefix.
  cron text not null,
  body bytea not null,
  -- The parsed configuration headers (see qstash_headers.MessageSpec).
  spec jsonb not null,
  caller_ip text,
  paused boolean not null default false,
  created_at timestamptz not null,
  last_fire_at timestamptz,
  next_fire_at timestamptz not null
);

create index if not exists schedules_next_fire_at_idx on {schema}.schedules (next_fire_at);

-- The message log that GET /v2/events serves.
create table if not exists {schema}.events (
  id bigserial primary key,
  time timestamptz not null default clock_timestamp(),
  message_id text not null,
  state text not null,
  url text not null,
  schedule_id text,
  label text,
  -- The remaining event fields, already in API shape (error, nextDeliveryTime, responseStatus, ...).
  detail jsonb not null default '{}'
);

create index if not exists events_message_id_idx on {schema}.events (message_id);
