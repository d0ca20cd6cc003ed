-- Up Migration
-- A problem the isolation monitor found inside an orchestra's database itself
-- (its marker names another orchestra). While set, the proxy refuses the
-- orchestra with 08004, like a shared address or fingerprint.
ALTER TABLE orchestras ADD COLUMN isolation_problem text;

-- Down Migration
ALTER TABLE orchestras DROP COLUMN isolation_problem;
