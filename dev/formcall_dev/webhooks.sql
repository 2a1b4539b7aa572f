-- Local stand-in for a Supabase Database Webhook on public.forms (dev stack only, never in
-- production, where the webhook is configured in Supabase). Each committed change is sent as
-- a NOTIFY with Supabase's payload; formcall_dev.webhooks forwards it to schedule-form.
create or replace function public.formcall_dev_forms_webhook() returns trigger
language plpgsql
as $$
begin
  perform pg_notify('formcall_forms_webhook', json_build_object(
    'type', tg_op, 'table', tg_table_name, 'schema', tg_table_schema,
    'record', case when tg_op <> 'DELETE' then row_to_json(new) end,
    'old_record', case when tg_op <> 'INSERT' then row_to_json(old) end)::text);
  return null;
end
$$;

drop trigger if exists formcall_dev_forms_webhook on public.forms;
create trigger formcall_dev_forms_webhook
  after insert or update or delete on public.forms
  for each row execute function public.formcall_dev_forms_webhook();
