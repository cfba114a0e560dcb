-- One database per service: services never share tables, only RPCs and the
-- object store. Run once by the postgres image on an empty data volume
-- (/docker-entrypoint-initdb.d). The trainer's workers use the trainer database,
-- where they claim queued jobs with SELECT ... FOR UPDATE SKIP LOCKED.
CREATE DATABASE dataset;
CREATE DATABASE trainer;
CREATE DATABASE predictor;
