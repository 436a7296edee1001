-- A results.duckdb written by scf-pipeline at commit bc00207 (schema version 1, before versioning):
-- its tables and rows, dumped. tests/test_results_db.py loads it and opens it with today's code.
CREATE TABLE candidates(config_name VARCHAR, id VARCHAR, kind VARCHAR NOT NULL, "label" VARCHAR NOT NULL, "method" VARCHAR, params_json VARCHAR NOT NULL, sources_json VARCHAR NOT NULL, path VARCHAR, created TIMESTAMP NOT NULL, PRIMARY KEY(config_name, id));
CREATE TABLE champions(config_name VARCHAR PRIMARY KEY, candidate_id VARCHAR NOT NULL, objective DOUBLE, path VARCHAR, promoted_at TIMESTAMP NOT NULL, run_id VARCHAR);
CREATE TABLE gate_decisions(config_name VARCHAR, candidate_id VARCHAR, decision VARCHAR NOT NULL, reasons_json VARCHAR NOT NULL, objective DOUBLE, decided_at TIMESTAMP NOT NULL, run_id VARCHAR, PRIMARY KEY(config_name, candidate_id));
CREATE TABLE generation_stats(config_name VARCHAR, model_id VARCHAR, repetition_rate DOUBLE NOT NULL, mean_seq_rep_4 DOUBLE NOT NULL, truncation_rate DOUBLE NOT NULL, n_generations INTEGER NOT NULL, refusal_rate DOUBLE, over_refusal_rate DOUBLE, sparsity DOUBLE, merge_seconds DOUBLE, eval_seconds DOUBLE NOT NULL, run_id VARCHAR, PRIMARY KEY(config_name, model_id));
CREATE TABLE scores(config_name VARCHAR, model_id VARCHAR, benchmark VARCHAR, metric VARCHAR, "value" DOUBLE NOT NULL, stderr DOUBLE, n INTEGER NOT NULL, n_total INTEGER NOT NULL, higher_is_better BOOLEAN NOT NULL, task_version VARCHAR NOT NULL, backend VARCHAR NOT NULL, gen_params_json VARCHAR NOT NULL, run_id VARCHAR, PRIMARY KEY(config_name, model_id, benchmark, metric));
INSERT INTO candidates VALUES ('demo', 'p-ffff', 'parent', 'base=math', NULL, '{}', '[{"role": "base", "ref": "zoo:math", "revision": null, "fingerprint": "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff", "path": "/m"}]', '/m', '2026-12-02 12:07:45.777207');
INSERT INTO candidates VALUES ('demo', 'c1', 'merge', 'scf_rkl', 'scf_rkl', '{"alpha": 1.5}', '[{"role": "base", "ref": "zoo:math", "revision": null, "fingerprint": "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff", "path": "/m"}]', '/m', '2026-12-02 12:07:45.819621');
INSERT INTO champions VALUES ('demo', 'c1', '0.5', '/m', '2026-12-02 12:07:45.861892', 'run-1');
INSERT INTO gate_decisions VALUES ('demo', 'c1', 'promoted', '["passed every check"]', '0.5', '2026-12-02 12:07:45.861892', 'run-1');
INSERT INTO generation_stats VALUES ('demo', 'p-ffff', '0.0', '0.01', '0.0', '8', '0.5', NULL, NULL, NULL, '1.0', 'run-1');
INSERT INTO generation_stats VALUES ('demo', 'c1', '0.0', '0.01', '0.0', '8', '0.5', NULL, NULL, NULL, '1.0', 'run-1');
INSERT INTO scores VALUES ('demo', 'p-ffff', 'toy_math', 'exact_match', '1.0', '0.1', '4', '100', 'True', '1', 'transformers', '{}', 'run-1');
INSERT INTO scores VALUES ('demo', 'c1', 'toy_math', 'exact_match', '0.5', '0.1', '4', '100', 'True', '1', 'transformers', '{}', 'run-1');
