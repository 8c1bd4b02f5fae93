-- The login that user SQL runs as (`--query`, `ChipDataset(query=…)`; stacchip_db/db/user_sql.py).
-- A superuser session cannot be sandboxed with SET ROLE (the query could set `role` back), so
-- user SQL gets a login of its own that may only read:
--   USAGE on schemas stacchip and pgstac, SELECT on their tables and views (not
--   stacchip.query_login, which holds the password), EXECUTE on stacchip's functions that are
--   not SECURITY DEFINER. Nothing else is granted: PostgreSQL's superuser-only functions
--   (pg_read_file, lo_import, lo_export, pg_reload_conf, replication slots…) stay refused, and
--   pgstac revokes its SECURITY DEFINER functions from PUBLIC.
-- Roles are cluster-wide, grants per database: the role is named after this database's oid, so
-- each database on a server has its own login and `db init` on one never touches another's. A
-- copy made with CREATE DATABASE … TEMPLATE keeps the template's row and grants (and so logs in
-- as the template's role) until its own `db init`, which gives it its own role and revokes the
-- template's here.
-- Every run sets a new random password (gen_random_uuid: the server's strong random source; it
-- never appears in a statement text or log line), which also repairs a changed password or a
-- dropped role. Without CREATEROLE the step is skipped with a notice and user SQL needs
-- STACCHIP_QUERY_DATABASE_URL (README, "Who runs your SQL").
DO $$
DECLARE
    this_oid oid := (SELECT oid FROM pg_database WHERE datname = current_database());
    wanted name := 'stacchip_query_' || this_oid;
    previous name := (SELECT role FROM stacchip.query_login);
    secret text := replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '');
    existing pg_roles%ROWTYPE;
    fn regprocedure;
BEGIN
    SELECT * INTO existing FROM pg_roles WHERE rolname = wanted;
    IF NOT FOUND THEN
        EXECUTE format('CREATE ROLE %I LOGIN NOINHERIT PASSWORD %L', wanted, secret);
    ELSIF existing.rolsuper OR existing.rolcreaterole OR existing.rolcreatedb
            OR existing.rolreplication OR existing.rolbypassrls
            OR EXISTS (SELECT FROM pg_auth_members WHERE member = existing.oid) THEN
        RAISE EXCEPTION 'role % exists and may do more than log in (an attribute or a role '
            'membership); it cannot run user SQL: drop it (DROP ROLE %) and run db init again',
            wanted, wanted USING ERRCODE = 'object_not_in_prerequisite_state';
    ELSE
        EXECUTE format('ALTER ROLE %I LOGIN PASSWORD %L', wanted, secret);
    END IF;

    IF previous IS NOT NULL AND previous <> wanted
            AND EXISTS (SELECT FROM pg_roles WHERE rolname = previous) THEN
        EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA stacchip, pgstac FROM %I', previous);
        EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA stacchip FROM %I', previous);
        EXECUTE format('REVOKE ALL ON SCHEMA stacchip, pgstac FROM %I', previous);
    END IF;

    BEGIN  -- PUBLIC has CONNECT unless an administrator revoked it; say it explicitly if we may
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), wanted);
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE NOTICE 'cannot grant CONNECT on database % to %: grant it yourself if PUBLIC '
            'lacks it', current_database(), wanted;
    END;
    EXECUTE format('GRANT USAGE ON SCHEMA stacchip, pgstac TO %I', wanted);
    EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA stacchip, pgstac TO %I', wanted);
    EXECUTE format('REVOKE ALL ON stacchip.query_login FROM %I', wanted);
    FOR fn IN
        SELECT p.oid::regprocedure FROM pg_proc p
        WHERE p.pronamespace = 'stacchip'::regnamespace AND p.prokind = 'f' AND NOT p.prosecdef
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', fn, wanted);
    END LOOP;

    INSERT INTO stacchip.query_login (database_oid, role, password)
    VALUES (this_oid, wanted, secret)
    ON CONFLICT (one) DO UPDATE
        SET database_oid = EXCLUDED.database_oid, role = EXCLUDED.role,
            password = EXCLUDED.password;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'no restricted login for user SQL (%): run db init as a role with CREATEROLE, '
        'or set STACCHIP_QUERY_DATABASE_URL', SQLERRM;
END
$$;
