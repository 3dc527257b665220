"""The projection tables and the SQL that derives them from ``events``.

``events`` holds every event flattened (the payload as JSON). Every other table is a function
of ``events`` alone, recomputed for the jobs, nodes and sweeps a batch touched (or appended,
for the append-only ones), so applying a log in batches of any size gives the same tables as
one replay from nothing. Parameters ``$lo`` and ``$hi``: the batch is ``lo < seq <= hi``.
"""

from __future__ import annotations

VERSION = 1

TABLES = ("events", "jobs", "attempts", "metrics", "nodes", "utilization", "gpu_utilization",
          "sweeps")

# Primary keys: the digest orders every table by these.
KEYS = {
    "events": "seq",
    "jobs": "job_id",
    "attempts": "job_id, attempt, lease_epoch",
    "metrics": "seq, name",
    "nodes": "node",
    "utilization": "seq",
    "gpu_utilization": "seq, gpu",
    "sweeps": "sweep_id",
}

DDL = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value BIGINT);
CREATE TABLE IF NOT EXISTS events (
    seq BIGINT, time DOUBLE, type VARCHAR, job_id VARCHAR, node VARCHAR,
    sweep_id VARCHAR, attempt INTEGER, lease_epoch BIGINT, payload JSON);
CREATE TABLE IF NOT EXISTS jobs (
    job_id VARCHAR, sweep_id VARCHAR, model_type VARCHAR, name VARCHAR, state VARCHAR,
    node VARCHAR, attempts INTEGER, priority INTEGER, params JSON, metrics JSON,
    artifacts JSON, error VARCHAR, submitted_seq BIGINT, submitted_at DOUBLE,
    started_at DOUBLE, finished_at DOUBLE, duration_s DOUBLE, trainer VARCHAR,
    callable VARCHAR, command JSON, seed BIGINT, tags JSON, spec JSON);
CREATE TABLE IF NOT EXISTS attempts (
    job_id VARCHAR, attempt INTEGER, lease_epoch BIGINT, node VARCHAR, devices JSON,
    ahead BOOLEAN, fallback VARCHAR, leased_at DOUBLE, started_at DOUBLE, ended_at DOUBLE,
    outcome VARCHAR, error VARCHAR, exit_code INTEGER, pid INTEGER, env JSON);
CREATE TABLE IF NOT EXISTS metrics (
    seq BIGINT, job_id VARCHAR, lease_epoch BIGINT, kind VARCHAR, step BIGINT, epoch BIGINT,
    name VARCHAR, value DOUBLE, time DOUBLE);
CREATE TABLE IF NOT EXISTS nodes (
    node VARCHAR, hostname VARCHAR, labels JSON, cpus DOUBLE, mem_gb DOUBLE, gpus INTEGER,
    vram_gb DOUBLE, slots INTEGER, state VARCHAR, joined_at DOUBLE, last_event_at DOUBLE,
    joins INTEGER);
CREATE TABLE IF NOT EXISTS utilization (
    seq BIGINT, time DOUBLE, node VARCHAR, cpu DOUBLE, mem DOUBLE, running INTEGER);
CREATE TABLE IF NOT EXISTS gpu_utilization (
    seq BIGINT, time DOUBLE, node VARCHAR, gpu INTEGER, util DOUBLE, vram_used_gb DOUBLE,
    vram_total_gb DOUBLE);
CREATE TABLE IF NOT EXISTS sweeps (
    sweep_id VARCHAR, name VARCHAR, state VARCHAR, jobs INTEGER, queued INTEGER,
    running INTEGER, completed INTEGER, failed INTEGER, cancelled INTEGER, best_job VARCHAR,
    submitted_at DOUBLE, finished_at DOUBLE, spec JSON);
"""

# Lower is better for these metric names (and any name ending in loss or error).
LOWER_IS_BETTER = ("brier", "logloss", "log_loss", "loss", "rmse", "mse", "mae", "error",
                   "duration_s", "ece")

VIEWS = f"""
CREATE OR REPLACE VIEW queue AS
    SELECT job_id, sweep_id, model_type, name, priority, attempts, submitted_at, params
    FROM jobs WHERE state = 'queued' ORDER BY priority DESC, submitted_seq;
CREATE OR REPLACE VIEW final_metrics AS
    SELECT j.job_id, j.sweep_id, j.model_type, j.params, m.key AS metric,
           CAST(m.value AS DOUBLE) AS value,
           (m.key IN {LOWER_IS_BETTER!r} OR m.key LIKE '%loss' OR m.key LIKE '%error')
               AS lower_is_better
    FROM jobs j, json_each(j.metrics) m
    WHERE j.state = 'completed' AND json_type(m.value) IN ('DOUBLE', 'BIGINT', 'UBIGINT');
CREATE OR REPLACE VIEW leaderboard AS
    SELECT sweep_id, metric, rank() OVER (
               PARTITION BY sweep_id, metric
               ORDER BY CASE WHEN lower_is_better THEN value ELSE -value END, job_id) AS rank,
           job_id, model_type, value, lower_is_better, params
    FROM final_metrics;
CREATE OR REPLACE VIEW utilization_summary AS
    WITH busy AS (
        SELECT node, count(*) FILTER (WHERE outcome = 'completed') AS jobs_completed,
               count(*) AS attempts_run,
               sum(coalesce(ended_at, started_at) - started_at) AS busy_s
        FROM attempts WHERE started_at IS NOT NULL GROUP BY node),
    gpu AS (
        SELECT node, avg(util) AS mean_gpu_util, avg(vram_used_gb) AS mean_vram_used_gb,
               max(vram_used_gb) AS max_vram_used_gb
        FROM gpu_utilization GROUP BY node),
    cpu AS (SELECT node, avg(cpu) AS mean_cpu, avg(mem) AS mean_mem FROM utilization GROUP BY node)
    SELECT n.node, n.labels, n.slots, n.state,
           n.last_event_at - n.joined_at AS present_s,
           coalesce(b.busy_s, 0) AS busy_s,
           CASE WHEN n.last_event_at > n.joined_at
                THEN coalesce(b.busy_s, 0) / (n.slots * (n.last_event_at - n.joined_at)) END
               AS busy_fraction,
           greatest(n.slots * (n.last_event_at - n.joined_at) - coalesce(b.busy_s, 0), 0)
               AS idle_slot_s,
           coalesce(b.jobs_completed, 0) AS jobs_completed,
           coalesce(b.attempts_run, 0) AS attempts_run,
           c.mean_cpu, c.mean_mem, g.mean_gpu_util, g.mean_vram_used_gb, g.max_vram_used_gb
    FROM nodes n LEFT JOIN busy b USING (node) LEFT JOIN gpu g USING (node)
         LEFT JOIN cpu c USING (node);
"""

_LIFECYCLE = ("'JobSubmitted', 'JobLeased', 'JobStarted', 'JobCompleted', 'JobFailed', "
              "'RetryScheduled', 'JobCancelled', 'LeaseExpired'")

# Each step: (table it fills, SQL). Run in order inside one transaction per batch.
DERIVE = [
    ("jobs", """
DELETE FROM jobs WHERE job_id IN (
    SELECT DISTINCT job_id FROM events WHERE seq > $lo AND seq <= $hi AND job_id IS NOT NULL);
"""),
    ("jobs", f"""
INSERT INTO jobs
WITH touched AS (
    SELECT DISTINCT job_id FROM events WHERE seq > $lo AND seq <= $hi AND job_id IS NOT NULL),
ev AS (SELECT e.* FROM events e JOIN touched t USING (job_id) WHERE e.seq <= $hi),
agg AS (
    SELECT job_id,
        any_value(payload) FILTER (WHERE type = 'JobSubmitted') AS sub,
        min(seq) FILTER (WHERE type = 'JobSubmitted') AS submitted_seq,
        min(time) FILTER (WHERE type = 'JobSubmitted') AS submitted_at,
        arg_max(type, seq) FILTER (WHERE type IN ({_LIFECYCLE})) AS last_type,
        arg_max(payload ->> '$.final', seq) FILTER (WHERE type = 'JobFailed') AS last_final,
        arg_max(node, seq) FILTER (WHERE type = 'JobLeased') AS node,
        count(*) FILTER (WHERE type = 'JobLeased') AS attempts,
        max(time) FILTER (WHERE type = 'JobStarted') AS started_at,
        max(time) FILTER (WHERE type IN ('JobCompleted', 'JobCancelled')
                          OR (type = 'JobFailed' AND payload ->> '$.final' = 'true'))
            AS finished_at,
        arg_max(payload -> '$.metrics', seq) FILTER (WHERE type = 'JobCompleted') AS metrics,
        arg_max(payload -> '$.artifacts', seq) FILTER (WHERE type = 'JobCompleted') AS artifacts,
        arg_max(CAST(payload ->> '$.duration_s' AS DOUBLE), seq)
            FILTER (WHERE type = 'JobCompleted') AS duration_s,
        arg_max(payload ->> '$.error', seq) FILTER (WHERE type = 'JobFailed') AS error
    FROM ev GROUP BY job_id)
SELECT job_id, sub ->> '$.spec.sweep_id', sub ->> '$.spec.model_type', sub ->> '$.spec.name',
    CASE last_type
        WHEN 'JobLeased' THEN 'leased' WHEN 'JobStarted' THEN 'running'
        WHEN 'JobCompleted' THEN 'completed' WHEN 'JobCancelled' THEN 'cancelled'
        WHEN 'JobFailed' THEN CASE WHEN last_final = 'true' THEN 'failed' ELSE 'queued' END
        ELSE 'queued' END,
    node, attempts, coalesce(CAST(sub ->> '$.spec.priority' AS INTEGER), 0),
    coalesce(sub -> '$.spec.params', '{{}}'), metrics, artifacts, error, submitted_seq,
    submitted_at, started_at, finished_at, duration_s, sub ->> '$.spec.trainer',
    sub ->> '$.spec.callable', sub -> '$.spec.command', CAST(sub ->> '$.spec.seed' AS BIGINT),
    coalesce(sub -> '$.spec.tags', '{{}}'), sub -> '$.spec'
FROM agg WHERE sub IS NOT NULL;
"""),
    ("attempts", """
DELETE FROM attempts WHERE job_id IN (
    SELECT DISTINCT job_id FROM events WHERE seq > $lo AND seq <= $hi AND job_id IS NOT NULL);
"""),
    ("attempts", """
INSERT INTO attempts
WITH touched AS (
    SELECT DISTINCT job_id FROM events WHERE seq > $lo AND seq <= $hi AND job_id IS NOT NULL),
ev AS (SELECT e.* FROM events e JOIN touched t USING (job_id) WHERE e.seq <= $hi),
leases AS (SELECT job_id, seq AS lease_epoch, attempt, node, time AS leased_at, payload
           FROM ev WHERE type = 'JobLeased'),
ends AS (
    SELECT lease_epoch, job_id,
        arg_min(type, seq) AS end_type, min(time) AS ended_at,
        arg_min(payload ->> '$.error', seq) AS error,
        arg_min(CAST(payload ->> '$.exit_code' AS INTEGER), seq) AS exit_code
    FROM ev WHERE type IN ('JobCompleted', 'JobFailed', 'LeaseExpired') AND lease_epoch > 0
    GROUP BY lease_epoch, job_id),
cancels AS (  -- a cancel names no lease: it ends the lease current at that moment
    SELECT l.lease_epoch, min(c.time) AS ended_at
    FROM leases l JOIN ev c ON c.job_id = l.job_id AND c.type = 'JobCancelled'
        AND c.seq > l.lease_epoch
    GROUP BY l.lease_epoch),
starts AS (
    SELECT lease_epoch, min(time) AS started_at, arg_min(pid_, seq) AS pid,
           arg_min(env_, seq) AS env
    FROM (SELECT lease_epoch, time, seq, CAST(payload ->> '$.pid' AS INTEGER) AS pid_,
                 payload -> '$.env' AS env_ FROM ev WHERE type = 'JobStarted')
    GROUP BY lease_epoch)
SELECT l.job_id, l.attempt, l.lease_epoch, l.node, l.payload -> '$.devices',
    coalesce(CAST(l.payload ->> '$.ahead' AS BOOLEAN), false),
    coalesce(l.payload ->> '$.fallback', ''), l.leased_at, s.started_at,
    coalesce(e.ended_at, c.ended_at),
    CASE e.end_type WHEN 'JobCompleted' THEN 'completed' WHEN 'JobFailed' THEN 'failed'
        WHEN 'LeaseExpired' THEN 'expired'
        ELSE CASE WHEN c.ended_at IS NOT NULL THEN 'cancelled' ELSE 'open' END END,
    e.error, e.exit_code, s.pid, s.env
FROM leases l LEFT JOIN ends e USING (lease_epoch) LEFT JOIN starts s USING (lease_epoch)
    LEFT JOIN cancels c USING (lease_epoch);
"""),
    ("metrics", """
INSERT INTO metrics
SELECT e.seq, e.job_id, e.lease_epoch,
    CASE e.type WHEN 'JobCompleted' THEN 'final' WHEN 'Checkpointed' THEN 'checkpoint'
        ELSE 'progress' END,
    CAST(e.payload ->> '$.step' AS BIGINT), CAST(e.payload ->> '$.epoch' AS BIGINT),
    m.key, CAST(m.value AS DOUBLE), e.time
FROM events e, json_each(e.payload -> '$.metrics') m
WHERE e.seq > $lo AND e.seq <= $hi AND e.type IN ('Progress', 'Checkpointed', 'JobCompleted');
"""),
    ("utilization", """
INSERT INTO utilization
SELECT seq, time, node, CAST(payload ->> '$.cpu' AS DOUBLE), CAST(payload ->> '$.mem' AS DOUBLE),
    CAST(payload ->> '$.running' AS INTEGER)
FROM events WHERE seq > $lo AND seq <= $hi AND type = 'UtilizationSampled';
"""),
    ("gpu_utilization", """
INSERT INTO gpu_utilization
SELECT e.seq, e.time, e.node, CAST(g.value ->> '$.index' AS INTEGER),
    CAST(g.value ->> '$.util' AS DOUBLE), CAST(g.value ->> '$.vram_used_gb' AS DOUBLE),
    CAST(g.value ->> '$.vram_total_gb' AS DOUBLE)
FROM events e, json_each(e.payload -> '$.gpus') g
WHERE e.seq > $lo AND e.seq <= $hi AND e.type = 'UtilizationSampled';
"""),
    ("nodes", """
DELETE FROM nodes WHERE node IN (
    SELECT DISTINCT node FROM events WHERE seq > $lo AND seq <= $hi AND node IS NOT NULL
    AND type IN ('NodeJoined', 'NodeLost', 'NodeLeft', 'UtilizationSampled', 'JobLeased'));
"""),
    ("nodes", """
INSERT INTO nodes
WITH touched AS (
    SELECT DISTINCT node FROM events WHERE seq > $lo AND seq <= $hi AND node IS NOT NULL
    AND type IN ('NodeJoined', 'NodeLost', 'NodeLeft', 'UtilizationSampled', 'JobLeased')),
ev AS (SELECT e.* FROM events e JOIN touched t USING (node) WHERE e.seq <= $hi
       AND e.type IN ('NodeJoined', 'NodeLost', 'NodeLeft', 'UtilizationSampled', 'JobLeased')),
agg AS (
    SELECT node, arg_max(payload, seq) FILTER (WHERE type = 'NodeJoined') AS j,
        arg_max(type, seq) FILTER (WHERE type IN ('NodeJoined', 'NodeLost', 'NodeLeft')) AS last,
        min(time) FILTER (WHERE type = 'NodeJoined') AS joined_at, max(time) AS last_event_at,
        count(*) FILTER (WHERE type = 'NodeJoined') AS joins
    FROM ev GROUP BY node)
SELECT node, j ->> '$.hostname', coalesce(j -> '$.labels', '[]'), CAST(j ->> '$.cpus' AS DOUBLE),
    CAST(j ->> '$.mem_gb' AS DOUBLE), CAST(json_array_length(j -> '$.gpus') AS INTEGER),
    (SELECT sum(CAST(g.value ->> '$.vram_gb' AS DOUBLE)) FROM json_each(j -> '$.gpus') g),
    CAST(j ->> '$.slots' AS INTEGER),
    CASE last WHEN 'NodeJoined' THEN 'alive' WHEN 'NodeLost' THEN 'lost' ELSE 'left' END,
    joined_at, last_event_at, joins
FROM agg WHERE j IS NOT NULL;
"""),
    ("sweeps", """
DELETE FROM sweeps WHERE sweep_id IN (
    SELECT sweep_id FROM events WHERE seq > $lo AND seq <= $hi AND sweep_id IS NOT NULL
    UNION SELECT j.sweep_id FROM jobs j JOIN (SELECT DISTINCT job_id FROM events
        WHERE seq > $lo AND seq <= $hi) t USING (job_id) WHERE j.sweep_id IS NOT NULL);
"""),
    ("sweeps", """
INSERT INTO sweeps
WITH touched AS (
    SELECT sweep_id FROM events WHERE seq > $lo AND seq <= $hi AND sweep_id IS NOT NULL
    UNION SELECT j.sweep_id FROM jobs j JOIN (SELECT DISTINCT job_id FROM events
        WHERE seq > $lo AND seq <= $hi) t USING (job_id) WHERE j.sweep_id IS NOT NULL),
sw AS (
    SELECT e.sweep_id, arg_max(e.payload, e.seq) FILTER (WHERE e.type = 'SweepSubmitted') AS s,
        min(e.time) FILTER (WHERE e.type = 'SweepSubmitted') AS submitted_at,
        max(e.time) FILTER (WHERE e.type = 'SweepCompleted') AS finished_at,
        arg_max(e.payload ->> '$.best_job', e.seq) FILTER (WHERE e.type = 'SweepCompleted')
            AS best_job
    FROM events e JOIN touched t USING (sweep_id)
    WHERE e.seq <= $hi AND e.type IN ('SweepSubmitted', 'SweepCompleted') GROUP BY e.sweep_id),
js AS (
    SELECT j.sweep_id, count(*) AS jobs,
        count(*) FILTER (WHERE state = 'queued') AS queued,
        count(*) FILTER (WHERE state IN ('leased', 'running')) AS running,
        count(*) FILTER (WHERE state = 'completed') AS completed,
        count(*) FILTER (WHERE state = 'failed') AS failed,
        count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
        min(submitted_at) AS first_submitted_at
    FROM jobs j JOIN touched t USING (sweep_id) GROUP BY j.sweep_id)
SELECT t.sweep_id, sw.s ->> '$.name',
    CASE WHEN sw.finished_at IS NOT NULL THEN 'completed'
         WHEN coalesce(js.queued, 0) + coalesce(js.running, 0) = 0 AND js.jobs > 0 THEN 'finished'
         ELSE 'running' END,
    coalesce(js.jobs, 0), coalesce(js.queued, 0), coalesce(js.running, 0),
    coalesce(js.completed, 0), coalesce(js.failed, 0), coalesce(js.cancelled, 0), sw.best_job,
    coalesce(sw.submitted_at, js.first_submitted_at), sw.finished_at, sw.s -> '$.spec'
FROM touched t LEFT JOIN sw USING (sweep_id) LEFT JOIN js USING (sweep_id);
"""),
]
