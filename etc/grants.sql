-- dpvoip's own PostgreSQL user in the CRM's database (attached mode): exactly the
-- privileges dpvoip needs, no more. Run it once as the CRM database's owner (or a
-- superuser), connected to the CRM's database:
--
--     psql "postgresql://OWNER@HOST/crm" -v ON_ERROR_STOP=1 -f etc/grants.sql
--
-- Written for the database `crm` with the CRM's tables in schema `public` (both CRM
-- versions, 2025-12 and 2026-08, have the same tables): change `crm` to your database's
-- name, and the password. Then DATABASE_URL=postgresql://dpvoip:PASSWORD@HOST/crm.
-- dpvoip creates its own schema `dpvoip` at its first start (it owns it, hence CREATE
-- on the database) and never creates or alters the CRM's tables. At start it checks
-- these privileges and, when one is missing, exits naming it ("needs SELECT on
-- public.accounting_clientprofile"); `dpvoip check` says the same.

CREATE ROLE dpvoip LOGIN PASSWORD 'change-me';
GRANT CONNECT, CREATE ON DATABASE crm TO dpvoip;
GRANT USAGE ON SCHEMA public TO dpvoip;
-- calls, their log lines and missed-call tickets
GRANT SELECT, INSERT, UPDATE ON public.accounting_voipcall, public.accounting_voipcalllog
  TO dpvoip;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.accounting_ticket TO dpvoip;
GRANT USAGE ON SEQUENCE public.accounting_voipcall_id_seq TO dpvoip;
-- who a number belongs to; "was in touch" on contacts and leads, a deal's workflow line
GRANT SELECT, UPDATE ON public.crm_contact, public.crm_lead, public.crm_deal TO dpvoip;
GRANT SELECT ON public.accounting_clientprofile, public.crm_company TO dpvoip;
-- CRM users, their phones and logins (click-to-call, ticket assignment)
GRANT SELECT ON public.auth_user, public.common_userprofile, public.voip_connection,
  public.django_session TO dpvoip;
