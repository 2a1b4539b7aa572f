-- Signed webhooks of public.forms to schedule-form (issue 14, finding 2).
--
-- A plain Supabase Database Webhook sends a static secret, kept in clear in the trigger's
-- arguments (pg_trigger is readable by every database role) and good forever once captured.
-- This trigger sends, for each committed change of forms, Supabase's webhook payload with
--   X-Formcall-Timestamp: <unix seconds>
--   X-Formcall-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>
-- and schedule-form refuses unsigned ones and ones older than 5 minutes. The secret (and the
-- URL) are read from Supabase Vault (`vault.decrypted_secrets`, names formcall_webhook_secret
-- and formcall_webhook_url); on Supabase the request goes out with pg_net (`net.http_post`,
-- sent after commit). Where Vault is missing (the dev stack's and the tests' plain
-- PostgreSQL) both come from public.formcall_dev_webhook_settings, and where pg_net is missing
-- the request is NOTIFYed on formcall_forms_webhook for the dev forwarder
-- (formcall_dev/webhooks.py) to POST exactly as it is. Not configured: nothing is sent (the
-- hourly sweep is the safety net), and the clinic's write never fails because of it.

-- Dev stack and tests only: the settings a plain PostgreSQL has no Vault for. Readable by the
-- owner alone (the trigger reads it as the owner).
create table public.formcall_dev_webhook_settings (
  name text primary key
    constraint formcall_dev_webhook_settings_known
    check (name in ('formcall_webhook_url', 'formcall_webhook_secret')),
  value text not null
);
alter table public.formcall_dev_webhook_settings enable row level security;
revoke all on public.formcall_dev_webhook_settings from public, anon, authenticated, service_role;

-- HMAC-SHA256 (RFC 2104): pgcrypto's hmac where installed (Supabase), else the same from the
-- built-in sha256(); tests check it equals Python's hmac for short, block-sized and long keys.
create or replace function public.formcall_hmac_sha256(p_key bytea, p_message bytea)
returns bytea
language plpgsql
stable
strict
as $$
declare
  crypto_schema name;
  k bytea := p_key;
  inner_pad bytea;
  outer_pad bytea;
  result bytea;
begin
  select n.nspname into crypto_schema
    from pg_catalog.pg_extension e join pg_catalog.pg_namespace n on n.oid = e.extnamespace
   where e.extname = 'pgcrypto';
  if crypto_schema is not null then
    execute format('select %I.hmac($1, $2, %L)', crypto_schema, 'sha256')
      into result using p_message, p_key;
    return result;
  end if;
  if length(k) > 64 then  -- SHA-256's block size
    k := sha256(k);
  end if;
  k := k || decode(repeat('00', 64 - length(k)), 'hex');
  inner_pad := k;
  outer_pad := k;
  for i in 0..63 loop
    inner_pad := set_byte(inner_pad, i, get_byte(k, i) # 54);  -- 0x36
    outer_pad := set_byte(outer_pad, i, get_byte(k, i) # 92);  -- 0x5c
  end loop;
  return sha256(outer_pad || sha256(inner_pad || p_message));
end
$$;

create or replace function public.formcall_webhook_setting(p_name text)
returns text
language plpgsql
stable
security definer
set search_path = pg_catalog, public, pg_temp
as $$
declare
  value text;
begin
  if to_regclass('vault.decrypted_secrets') is not null then
    execute 'select decrypted_secret from vault.decrypted_secrets where name = $1'
      into value using p_name;
    return value;
  end if;
  select s.value into value from public.formcall_dev_webhook_settings s where s.name = p_name;
  return value;
end
$$;

-- The one place a webhook is built and signed: the trigger sends what this returns, and the
-- dev forwarder posts it unchanged. `body` is the payload's exact text (jsonb's canonical
-- text, which is also what pg_net sends for a jsonb body); null when not configured.
create or replace function public.formcall_forms_webhook_request(
  p_type text, p_record jsonb, p_old_record jsonb, p_at timestamptz default now()
)
returns jsonb
language plpgsql
stable
security definer
set search_path = pg_catalog, public, pg_temp
as $$
declare
  url text := public.formcall_webhook_setting('formcall_webhook_url');
  secret text := public.formcall_webhook_setting('formcall_webhook_secret');
  body text := jsonb_build_object('type', p_type, 'table', 'forms', 'schema', 'public',
                                  'record', p_record, 'old_record', p_old_record)::text;
  stamp text := floor(extract(epoch from p_at))::bigint::text;
begin
  if url is null or secret is null or secret = '' then
    return null;
  end if;
  return jsonb_build_object(
    'url', url, 'body', body,
    'headers', jsonb_build_object(
      'Content-Type', 'application/json',
      'X-Formcall-Timestamp', stamp,
      'X-Formcall-Signature', 'v1=' || encode(public.formcall_hmac_sha256(
        convert_to(secret, 'UTF8'), convert_to(stamp || '.' || body, 'UTF8')), 'hex')));
end
$$;

create or replace function public.formcall_forms_webhook() returns trigger
language plpgsql
security definer
set search_path = pg_catalog, public, pg_temp
as $$
declare
  request jsonb;
begin
  request := public.formcall_forms_webhook_request(
    tg_op, case when tg_op <> 'DELETE' then to_jsonb(new) end,
    case when tg_op <> 'INSERT' then to_jsonb(old) end);
  if request is null then
    return null;
  end if;
  if exists (select 1 from pg_catalog.pg_proc p join pg_catalog.pg_namespace n
               on n.oid = p.pronamespace where n.nspname = 'net' and p.proname = 'http_post') then
    execute 'select net.http_post(url => $1, body => $2, headers => $3,
                                  timeout_milliseconds => 5000)'
      using request ->> 'url', (request ->> 'body')::jsonb, request -> 'headers';
  elsif octet_length(request::text) < 8000 then  -- NOTIFY's payload limit
    perform pg_notify('formcall_forms_webhook', request::text);
  else
    raise warning 'formcall webhook for form % too large to NOTIFY; not sent',
      coalesce(new.id, old.id);
  end if;
  return null;
end
$$;

create trigger formcall_forms_webhook after insert or update or delete on public.forms
  for each row execute function public.formcall_forms_webhook();

revoke execute on function public.formcall_hmac_sha256(bytea, bytea),
  public.formcall_webhook_setting(text),
  public.formcall_forms_webhook_request(text, jsonb, jsonb, timestamptz),
  public.formcall_forms_webhook() from public, anon, authenticated;
