-- Replay protection for QStash deliveries: each signed token (its `jti`) is accepted once.
--
-- QStash signs every delivery attempt afresh (a token lives about 5 minutes and retries come
-- up to a day later), so a second use of a jti is never QStash's retry: it is a captured
-- request played again. A row is kept until its token can no longer pass the signature check,
-- then pruned by later calls.
create table public.qstash_tokens (
  jti text primary key,
  expires_at timestamptz not null
);

create index qstash_tokens_expires_idx on public.qstash_tokens (expires_at);

alter table public.qstash_tokens enable row level security;

-- One atomic insert: of any number of concurrent uses of one jti, exactly one is accepted.
create or replace function public.accept_qstash_token(p_jti text, p_expires_at timestamptz)
returns jsonb
language plpgsql
as $$
declare
  accepted boolean;
begin
  -- A bounded prune per call keeps the table at about one row per live token without a job.
  delete from public.qstash_tokens
   where jti in (select t.jti from public.qstash_tokens t
                  where t.expires_at < now() order by t.expires_at limit 100);
  insert into public.qstash_tokens (jti, expires_at) values (p_jti, p_expires_at)
    on conflict (jti) do nothing;
  accepted := found;
  return jsonb_build_object('accepted', accepted);
end
$$;

revoke all on public.qstash_tokens from public, anon, authenticated;
grant select, insert, delete on public.qstash_tokens to service_role;
revoke execute on function public.accept_qstash_token(text, timestamptz)
  from public, anon, authenticated;
grant execute on function public.accept_qstash_token(text, timestamptz) to service_role;
