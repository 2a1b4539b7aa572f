-- A stale claim is reconciled with the newest Vapi call for its first form, looked for from a
-- minute before the claim (clock slack). A follow-up claimed less than a minute after the form's
-- previous call, whose own create-call never reached Vapi, finds that previous call: recording it
-- on the stale claim broke calls.vapi_call_id's uniqueness and stopped the whole sweep. A Vapi
-- call already recorded on another call is not this claim's: answer recorded = false, known =
-- true (the sweep then releases the claim).
create or replace function public.record_call_placed(p_call_id uuid, p_vapi_call_id text,
                                                     p_status text default null)
returns jsonb
language plpgsql
as $$
declare
  c public.calls;
begin
  if exists (select 1 from public.calls where vapi_call_id = p_vapi_call_id and id <> p_call_id)
  then
    return jsonb_build_object('recorded', false, 'known', true);
  end if;
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
