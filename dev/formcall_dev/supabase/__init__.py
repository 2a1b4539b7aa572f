"""What Supabase gives formcall, locally: PostgreSQL, the REST API's stand-in, pg_net's webhooks."""
