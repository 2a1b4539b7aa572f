-- Recording the message a form already has writes nothing new. Two reports of one call can
-- arrive together; both see the follow-up unpublished and both publish it under one
-- deduplication id, so QStash keeps one message and answers both with its id. The second
-- record is then a repeat: without this it wrote a 'rescheduled' event for a message that
-- had not changed. CREATE OR REPLACE keeps the function's grants.
create or replace function public.record_form_scheduled(
  p_form_id uuid, p_message_id text, p_deadline timestamptz, p_not_before timestamptz
)
returns jsonb
language plpgsql
set search_path = pg_catalog, public, pg_temp
as $$
declare
  f public.forms;
  previous text;
  previous_deadline timestamptz;
begin
  select qstash_message_id, scheduled_deadline into previous, previous_deadline
    from public.forms where id = p_form_id for update;
  if not found then
    return jsonb_build_object('recorded', false);
  end if;
  if previous is not distinct from p_message_id
     and previous_deadline is not distinct from p_deadline then
    return jsonb_build_object('recorded', true, 'changed', false);
  end if;
  update public.forms
     set qstash_message_id = p_message_id, scheduled_deadline = p_deadline
   where id = p_form_id
  returning * into f;
  insert into public.form_call_events (form_id, event, detail)
    values (f.id, case when previous is null then 'scheduled' else 'rescheduled' end,
            jsonb_build_object('message_id', p_message_id, 'deadline', p_deadline,
                               'not_before', p_not_before, 'previous_message_id', previous));
  return jsonb_build_object('recorded', true, 'changed', true);
end
$$;
