-- pgstac's functions (search, upsert_item…) resolve their own tables through search_path, so
-- pgstac asks for `pgstac, public` on every connection. Making it the database default lets
-- psql, QGIS and any pgstac client call `pgstac.search('{}')` without setting it themselves.
-- Takes effect for new sessions. Skipped with a notice where we do not own the database.
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I SET search_path TO pgstac, public', current_database());
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'not the owner of database %: set search_path to pgstac, public yourself',
        current_database();
END
$$;
