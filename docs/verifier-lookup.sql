-- tailgres --auth scram-verifier: the lookup role and its one function.
-- Run as a superuser in the database tailgres looks verifiers up in
-- (--verifier-database, default postgres), then give the role a password:
--   \password tailgres_auth
-- tailgres calls SELECT tailgres_auth.verifier($1) with the role name as a
-- bound parameter. The function reads pg_authid for that one role; the
-- lookup role can read nothing else. Superusers, roles that cannot log in
-- and expired passwords get NULL (tailgres then refuses the login as a
-- wrong password would be refused).
CREATE ROLE tailgres_auth LOGIN;
CREATE SCHEMA tailgres_auth;
REVOKE ALL ON SCHEMA tailgres_auth FROM PUBLIC;
GRANT USAGE ON SCHEMA tailgres_auth TO tailgres_auth;
CREATE FUNCTION tailgres_auth.verifier(rolename text) RETURNS text
    LANGUAGE sql STABLE STRICT SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT rolpassword FROM pg_authid
    WHERE rolname = $1 AND rolcanlogin AND NOT rolsuper
      AND (rolvaliduntil IS NULL OR rolvaliduntil > now())
$$;
REVOKE ALL ON FUNCTION tailgres_auth.verifier(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tailgres_auth.verifier(text) TO tailgres_auth;
