"""The projection tables and the SQL that folds a batch of events into them.

A batch is staged (STAGE: one ``json_transform`` per event into ``_b``, the common fields as
typed columns beside the JSON; the steps that need other fields parse them for their events).
``events`` takes the batch as it is; the append-only tables (metrics, utilization) take their
rows from it; the keyed tables (jobs, attempts, nodes, sweeps) are folded: each touched row is
computed from its old value and the batch's aggregates, then replaces the old row. Every merge
is associative (first value, last value, count, max), so applying a log in batches of any size
gives the same tables as one replay from nothing, and a batch costs what is in it, not what
came before it.
"""

from __future__ import annotations

from evo.direction import lower_is_better_sql
from evo.events.lifecycle import FAILED, QUEUED, STATE_AFTER

VERSION = 6  # 2: derived tables folded incrementally; 3: final_metrics a view over metrics;
# 4: jobs.held and nodes.drained; 5: a catch-up batch is one transaction (a file whose split
# commit a crash left half done is rebuilt, not trimmed); 6: pruned trials (sweeps.pruned)

# What the digest covers (final_metrics is a view, but it is what leaderboards are made of).
TABLES = ("events", "jobs", "attempts", "metrics", "final_metrics", "nodes", "utilization",
          "gpu_utilization", "sweeps")

# Primary keys: the digest orders every table by these.
KEYS = {
    "events": "seq",
    "jobs": "job_id",
    "attempts": "job_id, attempt, lease_epoch",
    "metrics": "seq, name",
    "final_metrics": "job_id, metric",
    "nodes": "node",
    "utilization": "seq",
    "gpu_utilization": "seq, gpu",
    "sweeps": "sweep_id",
}

DDL = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value BIGINT);
-- The last seq whose rows the append-only tables (APPENDED) hold: always meta.last_seq since
-- version 5 (one transaction per batch); kept for the schema, read by nothing.
CREATE TABLE IF NOT EXISTS appended (last_seq BIGINT);
CREATE TABLE IF NOT EXISTS events (
    seq BIGINT, time DOUBLE, type VARCHAR, job_id VARCHAR, node VARCHAR,
    sweep_id VARCHAR, attempt INTEGER, lease_epoch BIGINT,
    payload JSON USING COMPRESSION zstd);  -- half the time and a third of the size of FSST
CREATE TABLE IF NOT EXISTS jobs (
    job_id VARCHAR, sweep_id VARCHAR, model_type VARCHAR, name VARCHAR, state VARCHAR,
    node VARCHAR, attempts INTEGER, priority INTEGER,
    params JSON USING COMPRESSION zstd, metrics JSON USING COMPRESSION zstd,
    artifacts JSON, error VARCHAR, submitted_seq BIGINT, submitted_at DOUBLE,
    started_at DOUBLE, finished_at DOUBLE, duration_s DOUBLE, trainer VARCHAR,
    callable VARCHAR, command JSON, seed BIGINT, tags JSON,
    spec JSON USING COMPRESSION zstd,  -- long documents: zstd checkpoints faster than FSST
    held BOOLEAN);
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
    joins INTEGER, drained BOOLEAN);
CREATE TABLE IF NOT EXISTS utilization (
    seq BIGINT, time DOUBLE, node VARCHAR, cpu DOUBLE, mem DOUBLE, running INTEGER);
CREATE TABLE IF NOT EXISTS gpu_utilization (
    seq BIGINT, time DOUBLE, node VARCHAR, gpu INTEGER, util DOUBLE, vram_used_gb DOUBLE,
    vram_total_gb DOUBLE);
CREATE TABLE IF NOT EXISTS sweeps (
    sweep_id VARCHAR, name VARCHAR, state VARCHAR, jobs INTEGER, queued INTEGER,
    running INTEGER, completed INTEGER, failed INTEGER, cancelled INTEGER, best_job VARCHAR,
    submitted_at DOUBLE, finished_at DOUBLE, spec JSON, pruned INTEGER);
"""

VIEWS = f"""
CREATE OR REPLACE VIEW final_metrics AS  -- a completed job's metrics, from its JobCompleted
    SELECT m.job_id, j.sweep_id, j.model_type, m.name AS metric, m.value,
        {lower_is_better_sql("m.name", "CASE WHEN m.name = s.spec ->> '$.metric' "
                                       "THEN s.spec ->> '$.mode' END")} AS lower_is_better
    FROM metrics m JOIN jobs j USING (job_id) LEFT JOIN sweeps s ON s.sweep_id = j.sweep_id
    WHERE m.kind = 'final' AND j.state = 'completed' AND m.value IS NOT NULL;
CREATE OR REPLACE VIEW queue AS
    SELECT job_id, sweep_id, model_type, name, priority, attempts, submitted_at, params
    FROM jobs WHERE state = 'queued' ORDER BY priority DESC, submitted_seq;
CREATE OR REPLACE VIEW leaderboard AS
    SELECT f.sweep_id, f.metric, rank() OVER (
               PARTITION BY f.sweep_id, f.metric
               ORDER BY CASE WHEN f.lower_is_better THEN f.value ELSE -f.value END,
                        j.submitted_seq)  -- ties: the earliest submitted, as the desk's best
               AS rank,
           f.job_id, f.model_type, f.value, f.lower_is_better, j.params
    FROM final_metrics f JOIN jobs j USING (job_id);
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


# The events that move a job, and its state after the last of them: from the lifecycle table.
_LIFECYCLE = ", ".join(f"'{k}'" for k, after in STATE_AFTER.items() if after)
_STATE = "CASE n.last_type " + " ".join(
    f"WHEN '{k}' THEN "
    + (f"CASE WHEN n.last_final THEN '{FAILED}' ELSE '{after}' END" if k == "JobFailed"
       else f"'{after}'")
    for k, after in STATE_AFTER.items() if after) + f" ELSE '{QUEUED}' END"
_ENDED = "('completed', 'failed', 'expired', 'pruned')"

# The fields staged for every event: those of the events table, and a few scalars. Every field
# here is a column of every staged row, costing even where it is NULL; the others (the shapes
# below) are parsed from the payload by the step that needs them, for its events only, which
# cost less than a struct, list or map column on every row (5-10% of a catch-up each).
_SHAPE = """{"seq": "BIGINT", "time": "DOUBLE", "type": "VARCHAR", "job_id": "VARCHAR",
 "node": "VARCHAR", "sweep_id": "VARCHAR", "attempt": "INTEGER", "lease_epoch": "BIGINT",
 "spec": {"sweep_id": "VARCHAR"}, "error": "VARCHAR", "exit_code": "INTEGER", "final": "BOOLEAN",
 "cpu": "DOUBLE", "mem": "DOUBLE", "running": "INTEGER"}"""

_FIELDS = ("error", "exit_code", "final", "cpu", "mem", "running")

# What the metrics rows are made of (Progress, Checkpointed, JobCompleted), and a sample's GPUs.
_REPORTED = """{"step": "BIGINT", "epoch": "BIGINT", "metrics": "MAP(VARCHAR, DOUBLE)"}"""
_SAMPLED = """{"gpus": [{"index": "INTEGER", "util": "DOUBLE", "vram_used_gb": "DOUBLE",
 "vram_total_gb": "DOUBLE"}]}"""

# A lease's and a start's fields, read by the attempts fold.
_LEASED = """{"devices": "JSON", "ahead": "BOOLEAN", "fallback": "VARCHAR"}"""
_STARTED = """{"pid": "INTEGER", "env": "JSON"}"""

# A JobCompleted's documents, read by the jobs fold (one parse for the three).
_COMPLETED = """{"metrics": "JSON", "artifacts": "JSON", "duration_s": "DOUBLE"}"""

# A JobSubmitted's spec, read by the jobs fold for the jobs it inserts.
_SPEC = """{"spec": {"sweep_id": "VARCHAR", "model_type": "VARCHAR", "name": "VARCHAR",
 "priority": "INTEGER", "trainer": "VARCHAR", "callable": "VARCHAR", "seed": "BIGINT",
 "params": "JSON", "command": "JSON", "tags": "JSON"}}"""

# A NodeJoined's fields (GpuInfo's vram_gb is read here only).
_JOINED = """{"hostname": "VARCHAR", "cpus": "DOUBLE", "mem_gb": "DOUBLE", "slots": "INTEGER",
 "labels": "JSON", "gpus": [{"vram_gb": "DOUBLE"}]}"""

# The in-memory database (attached to the projection's) where batches are staged.
STAGE_DB = "_stage"

# From ``_batch`` (one column, ``payload``: each event's JSON, in seq order): one row per event,
# the _SHAPE fields as columns, and the payload, in the batch's order. It runs in the thread
# that builds the next batch while this one is folded; the fold reads it as ``_b``.
STAGE = f"""
SELECT s.seq, s.time, s.type, s.job_id, s.node,
    coalesce(s.sweep_id, CASE WHEN s.type = 'JobSubmitted' THEN s.spec.sweep_id END) AS sweep_id,
    s.attempt, CASE WHEN s.type = 'JobLeased' THEN s.seq ELSE s.lease_epoch END AS lease_epoch,
    {", ".join(f"s.{f} AS {f}" for f in _FIELDS)}, payload
FROM (SELECT json_transform(payload, '{_SHAPE}') AS s, payload FROM _batch)
"""

INSERT_EVENTS = """
INSERT INTO events
SELECT seq, time, type, job_id, node, sweep_id, attempt, lease_epoch, payload FROM _b;
"""

# (what, SQL), in order, after STAGE and INSERT_EVENTS, in the batch's transaction.
DERIVE = [
    ("jobs", f"""
CREATE OR REPLACE TEMP TABLE _jobs AS
WITH a AS (  -- per job: counts and times, and the seqs of the events whose fields it keeps
    SELECT job_id,
        min(seq) FILTER (WHERE type = 'JobSubmitted') AS sub_seq,
        max(seq) FILTER (WHERE type = 'JobCompleted') AS done_seq,
        max(seq) FILTER (WHERE type = 'JobFailed') AS fail_seq,
        max(seq) FILTER (WHERE type = 'JobLeased') AS lease_seq,
        arg_max(type, seq) AS last_type,
        count(*) FILTER (WHERE type = 'JobLeased') AS leases,
        -- started: its JobStarted, or the first report of one whose JobStarted was lost (as
        -- the broker's state has it)
        max(time) FILTER (WHERE type = 'JobStarted') AS started_at,
        min(time) FILTER (WHERE type IN ('Progress', 'Checkpointed')) AS reported_at,
        max(time) FILTER (WHERE type IN ('JobCompleted', 'JobCancelled', 'JobPruned')
                          OR (type = 'JobFailed' AND final)) AS finished_at,
        arg_max(type, seq) FILTER (WHERE type IN ('JobHeld', 'JobReleased')) AS hold
    FROM _b WHERE job_id IS NOT NULL AND type IN ({_LIFECYCLE}, 'JobHeld', 'JobReleased')
    GROUP BY job_id),
n AS (
    SELECT a.*, s.payload -> '$.spec' AS spec_json,
        json_transform(s.payload, '{_SPEC}').spec AS sp, s.time AS submitted_at,
        l.node, f.final AS last_final, f.error, c.d.metrics, c.d.artifacts, c.d.duration_s
    FROM a
    LEFT JOIN (SELECT seq, payload, time FROM _b WHERE type = 'JobSubmitted') s
        ON s.seq = a.sub_seq
    LEFT JOIN (SELECT seq, json_transform(payload, '{_COMPLETED}') AS d FROM _b
               WHERE type = 'JobCompleted') c ON c.seq = a.done_seq
    LEFT JOIN (SELECT seq, final, error FROM _b WHERE type = 'JobFailed') f
        ON f.seq = a.fail_seq
    LEFT JOIN (SELECT seq, node FROM _b WHERE type = 'JobLeased') l ON l.seq = a.lease_seq),
o AS (  -- the old rows, narrow: the UPDATE reads what it merges from the row it updates
    SELECT job_id, sweep_id FROM jobs WHERE job_id IN (SELECT job_id FROM a))
SELECT n.job_id, o.job_id IS NOT NULL AS has_old,
    CASE WHEN o.job_id IS NULL THEN n.sp.sweep_id ELSE o.sweep_id END AS sweep_id,
    {_STATE} AS state,
    n.node, CAST(n.leases AS INTEGER) AS leases, n.metrics, n.artifacts, n.error,
    coalesce(n.started_at, CASE WHEN n.lease_seq IS NOT NULL THEN n.reported_at END) AS started_at,
    n.reported_at, n.finished_at, n.duration_s, n.sp, n.spec_json, n.sub_seq, n.submitted_at,
    CASE n.hold WHEN 'JobHeld' THEN true WHEN 'JobReleased' THEN false END AS held
FROM n LEFT JOIN o USING (job_id)
WHERE o.job_id IS NOT NULL OR n.spec_json IS NOT NULL;
UPDATE jobs SET state = u.state, node = coalesce(u.node, jobs.node),
    attempts = jobs.attempts + u.leases, metrics = coalesce(u.metrics, jobs.metrics),
    artifacts = coalesce(u.artifacts, jobs.artifacts),
    error = CASE WHEN u.state = 'completed' THEN NULL ELSE coalesce(u.error, jobs.error) END,
    started_at = CASE WHEN u.started_at IS NOT NULL THEN greatest(jobs.started_at, u.started_at)
                      WHEN jobs.state = 'leased' THEN u.reported_at ELSE jobs.started_at END,
    finished_at = greatest(jobs.finished_at, u.finished_at),
    duration_s = coalesce(u.duration_s, jobs.duration_s), held = coalesce(u.held, jobs.held)
FROM _jobs u WHERE u.has_old AND jobs.job_id = u.job_id;
INSERT INTO jobs
SELECT job_id, sweep_id, sp.model_type, sp.name, state, node, leases, coalesce(sp.priority, 0),
    coalesce(sp.params, '{{}}'), metrics, artifacts,
    CASE WHEN state = 'completed' THEN NULL ELSE error END, sub_seq, submitted_at, started_at,
    finished_at, duration_s, sp.trainer, sp.callable, sp.command, sp.seed,
    coalesce(sp.tags, '{{}}'), spec_json, coalesce(held, false)
FROM _jobs WHERE NOT has_old;
"""),
    ("attempts", f"""
CREATE OR REPLACE TEMP TABLE _att AS
WITH leases AS (
    SELECT job_id, attempt, lease_epoch, node, x.devices, coalesce(x.ahead, false) AS ahead,
        coalesce(x.fallback, '') AS fallback, time AS leased_at
    FROM (SELECT *, json_transform(payload, '{_LEASED}') AS x FROM _b
          WHERE type = 'JobLeased')),
ends AS (
    SELECT lease_epoch, arg_min(type, seq) AS end_type, min(time) AS ended_at,
        arg_min(error, seq) AS error, arg_min(exit_code, seq) AS exit_code
    FROM _b WHERE type IN ('JobCompleted', 'JobFailed', 'LeaseExpired', 'JobPruned')
        AND lease_epoch > 0
    GROUP BY lease_epoch),
starts AS (
    SELECT lease_epoch, min(time) AS started_at, arg_min(x.pid, seq) AS pid,
        arg_min(x.env, seq) AS env
    FROM (SELECT lease_epoch, time, seq, json_transform(payload, '{_STARTED}') AS x FROM _b
          WHERE type = 'JobStarted')
    GROUP BY lease_epoch),
cancels AS (SELECT job_id, seq, time FROM _b WHERE type = 'JobCancelled'),
keys AS (
    SELECT lease_epoch FROM leases UNION SELECT lease_epoch FROM ends
    UNION SELECT lease_epoch FROM starts
    UNION SELECT a.lease_epoch FROM attempts a WHERE a.job_id IN (SELECT job_id FROM cancels)),
base AS (  -- the old row, or the lease that opens it
    SELECT k.lease_epoch, coalesce(o.job_id, l.job_id) AS job_id,
        o.* EXCLUDE (lease_epoch, job_id), l.attempt AS l_attempt, l.node AS l_node,
        l.devices AS l_devices, l.ahead AS l_ahead, l.fallback AS l_fallback,
        l.leased_at AS l_leased_at, o.job_id IS NOT NULL AS has_old
    FROM keys k LEFT JOIN attempts o USING (lease_epoch) LEFT JOIN leases l USING (lease_epoch)
    WHERE o.job_id IS NOT NULL OR l.job_id IS NOT NULL),
cx AS (  -- a cancel names no lease: it ends the lease current at that moment
    SELECT b.lease_epoch, min(c.time) AS ended_at
    FROM base b JOIN cancels c ON c.job_id = b.job_id AND c.seq > b.lease_epoch
    GROUP BY b.lease_epoch)
SELECT b.job_id,
    CASE WHEN b.has_old THEN b.attempt ELSE b.l_attempt END AS attempt,
    b.lease_epoch,
    CASE WHEN b.has_old THEN b.node ELSE b.l_node END AS node,
    CASE WHEN b.has_old THEN b.devices ELSE b.l_devices END AS devices,
    CASE WHEN b.has_old THEN b.ahead ELSE b.l_ahead END AS ahead,
    CASE WHEN b.has_old THEN b.fallback ELSE b.l_fallback END AS fallback,
    CASE WHEN b.has_old THEN b.leased_at ELSE b.l_leased_at END AS leased_at,
    coalesce(b.started_at, s.started_at) AS started_at,
    CASE WHEN b.outcome IN {_ENDED} THEN b.ended_at
         WHEN e.end_type IS NOT NULL THEN e.ended_at
         WHEN b.outcome = 'cancelled' THEN b.ended_at
         ELSE c.ended_at END AS ended_at,
    CASE WHEN b.outcome IN {_ENDED} THEN b.outcome
         WHEN e.end_type IS NOT NULL THEN
             CASE e.end_type WHEN 'JobCompleted' THEN 'completed' WHEN 'JobFailed' THEN 'failed'
                 WHEN 'JobPruned' THEN 'pruned' ELSE 'expired' END
         WHEN b.outcome = 'cancelled' OR c.ended_at IS NOT NULL THEN 'cancelled'
         ELSE 'open' END AS outcome,
    CASE WHEN b.outcome IN {_ENDED} THEN coalesce(b.error, e.error) ELSE e.error END AS error,
    CASE WHEN b.outcome IN {_ENDED} THEN coalesce(b.exit_code, e.exit_code) ELSE e.exit_code END
        AS exit_code,
    coalesce(b.pid, s.pid) AS pid,
    coalesce(b.env, s.env) AS env
FROM base b LEFT JOIN ends e USING (lease_epoch) LEFT JOIN starts s USING (lease_epoch)
    LEFT JOIN cx c USING (lease_epoch);
DELETE FROM attempts WHERE lease_epoch IN (SELECT lease_epoch FROM _att);
INSERT INTO attempts SELECT * FROM _att;
"""),
    ("metrics", f"""
INSERT INTO metrics
SELECT seq, job_id, lease_epoch,
    CASE type WHEN 'JobCompleted' THEN 'final' WHEN 'Checkpointed' THEN 'checkpoint'
        ELSE 'progress' END,
    r.step, r.epoch, m.key, m.value, time
FROM (SELECT seq, job_id, lease_epoch, type, time, r, unnest(map_entries(r.metrics)) AS m
      FROM (SELECT *, json_transform(payload, '{_REPORTED}') AS r
            FROM _b WHERE type IN ('Progress', 'Checkpointed', 'JobCompleted')));
"""),
    ("utilization", """
INSERT INTO utilization
SELECT seq, time, node, cpu, mem, running FROM _b WHERE type = 'UtilizationSampled';
"""),
    ("gpu_utilization", f"""
INSERT INTO gpu_utilization
SELECT seq, time, node, g.index, g.util, g.vram_used_gb, g.vram_total_gb
FROM (SELECT seq, time, node, unnest(json_transform(payload, '{_SAMPLED}').gpus) AS g
      FROM _b WHERE type = 'UtilizationSampled');
"""),
    ("nodes", f"""
CREATE OR REPLACE TEMP TABLE _nodes AS
WITH n AS (
    SELECT node,
        arg_max(seq, seq) FILTER (WHERE type = 'NodeJoined') AS join_seq,
        arg_max(type, seq) FILTER (WHERE type IN ('NodeJoined', 'NodeLost', 'NodeLeft')) AS last,
        min(time) FILTER (WHERE type = 'NodeJoined') AS joined_at, max(time) AS last_event_at,
        count(*) FILTER (WHERE type = 'NodeJoined') AS joins,
        arg_max(type, seq) FILTER (WHERE type IN ('NodeDrained', 'NodeResumed')) AS drain
    FROM _b WHERE node IS NOT NULL
      AND type IN ('NodeJoined', 'NodeLost', 'NodeLeft', 'UtilizationSampled', 'JobLeased',
                   'NodeDrained', 'NodeResumed')
    GROUP BY node),
j AS (  -- the node's latest NodeJoined in this batch
    SELECT node, b.hostname, coalesce(b.labels, '[]') AS labels, b.cpus, b.mem_gb,
        CAST(len(b.gpus) AS INTEGER) AS gpus,
        list_sum(list_transform(b.gpus, lambda g: g.vram_gb)) AS vram_gb, b.slots
    FROM (SELECT n.node, json_transform(b.payload, '{_JOINED}') AS b
          FROM n JOIN _b b ON b.seq = n.join_seq))
SELECT n.node,
    CASE WHEN j.node IS NULL THEN o.hostname ELSE j.hostname END AS hostname,
    CASE WHEN j.node IS NULL THEN o.labels ELSE j.labels END AS labels,
    CASE WHEN j.node IS NULL THEN o.cpus ELSE j.cpus END AS cpus,
    CASE WHEN j.node IS NULL THEN o.mem_gb ELSE j.mem_gb END AS mem_gb,
    CASE WHEN j.node IS NULL THEN o.gpus ELSE j.gpus END AS gpus,
    CASE WHEN j.node IS NULL THEN o.vram_gb ELSE j.vram_gb END AS vram_gb,
    CASE WHEN j.node IS NULL THEN o.slots ELSE j.slots END AS slots,
    CASE coalesce(n.last, '') WHEN '' THEN o.state WHEN 'NodeJoined' THEN 'alive'
        WHEN 'NodeLost' THEN 'lost' ELSE 'left' END AS state,
    coalesce(o.joined_at, n.joined_at) AS joined_at,
    greatest(o.last_event_at, n.last_event_at) AS last_event_at,
    CAST(coalesce(o.joins, 0) + n.joins AS INTEGER) AS joins,
    coalesce(CASE n.drain WHEN 'NodeDrained' THEN true WHEN 'NodeResumed' THEN false END,
             o.drained, false) AS drained
FROM n LEFT JOIN j USING (node) LEFT JOIN nodes o USING (node)
WHERE o.node IS NOT NULL OR j.node IS NOT NULL;
DELETE FROM nodes WHERE node IN (SELECT node FROM _nodes);
INSERT INTO nodes SELECT * FROM _nodes;
"""),
    ("sweeps", """
CREATE OR REPLACE TEMP TABLE _sweeps AS
WITH touched AS (
    SELECT sweep_id FROM _b WHERE sweep_id IS NOT NULL
    UNION SELECT sweep_id FROM _jobs WHERE sweep_id IS NOT NULL),
n AS (
    SELECT sweep_id,
        arg_max(payload ->> '$.name', seq) FILTER (WHERE type = 'SweepSubmitted') AS name,
        arg_max(payload -> '$.spec', seq) FILTER (WHERE type = 'SweepSubmitted') AS spec,
        min(time) FILTER (WHERE type = 'SweepSubmitted') AS submitted_at,
        max(time) FILTER (WHERE type = 'SweepCompleted') AS finished_at,
        arg_max(payload ->> '$.best_job', seq) FILTER (WHERE type = 'SweepCompleted')
            AS best_job
    FROM _b WHERE type IN ('SweepSubmitted', 'SweepCompleted') GROUP BY sweep_id),
js AS (
    SELECT j.sweep_id, count(*) AS jobs,
        count(*) FILTER (WHERE state = 'queued') AS queued,
        count(*) FILTER (WHERE state IN ('leased', 'running')) AS running,
        count(*) FILTER (WHERE state = 'completed') AS completed,
        count(*) FILTER (WHERE state = 'failed') AS failed,
        count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
        count(*) FILTER (WHERE state = 'pruned') AS pruned,
        min(submitted_at) AS first_submitted_at, max(submitted_at) AS last_submitted_at,
        max(finished_at) FILTER (WHERE state = 'cancelled') AS last_cancelled_at,
        max(finished_at) AS last_ended_at
    FROM jobs j WHERE j.sweep_id IN (SELECT sweep_id FROM touched) GROUP BY j.sweep_id),
m AS (  -- the SweepSubmitted fields: the latest submit's, its first time (o.spec: one was seen)
    SELECT t.sweep_id,
        CASE WHEN n.spec IS NOT NULL THEN n.name ELSE o.name END AS name,
        CASE WHEN n.spec IS NOT NULL THEN n.spec ELSE o.spec END AS spec,
        CASE WHEN o.spec IS NOT NULL THEN o.submitted_at ELSE n.submitted_at END AS submitted_at,
        greatest(o.finished_at, n.finished_at) AS finished_at,
        coalesce(n.best_job, o.best_job) AS best_job
    FROM touched t LEFT JOIN n USING (sweep_id) LEFT JOIN sweeps o USING (sweep_id))
SELECT m.sweep_id, m.name,
    CASE WHEN coalesce(js.queued, 0) + coalesce(js.running, 0) > 0 THEN 'running'  -- resumed too
         WHEN m.finished_at IS NULL THEN  -- a learning sweep between two trials runs on
             CASE WHEN js.jobs > 0 AND coalesce(m.spec ->> '$.method', '') <> 'tpe'
                  THEN 'finished' ELSE 'running' END
         WHEN js.last_cancelled_at >= js.last_ended_at THEN 'cancelled'  -- ended by a cancel
         ELSE 'completed' END AS state,
    CAST(coalesce(js.jobs, 0) AS INTEGER), CAST(coalesce(js.queued, 0) AS INTEGER),
    CAST(coalesce(js.running, 0) AS INTEGER), CAST(coalesce(js.completed, 0) AS INTEGER),
    CAST(coalesce(js.failed, 0) AS INTEGER), CAST(coalesce(js.cancelled, 0) AS INTEGER),
    m.best_job, coalesce(m.submitted_at, js.first_submitted_at), m.finished_at, m.spec,
    CAST(coalesce(js.pruned, 0) AS INTEGER)
FROM m LEFT JOIN js USING (sweep_id);
DELETE FROM sweeps WHERE sweep_id IN (SELECT sweep_id FROM _sweeps);
INSERT INTO sweeps SELECT * FROM _sweeps;
"""),
]

DROP_STAGED = "DROP TABLE _jobs; DROP TABLE _att; DROP TABLE _nodes; DROP TABLE _sweeps;"

# The tables a batch only appends to, each row carrying its event's seq: ``events`` (by
# INSERT_EVENTS) and these steps of DERIVE, run before the keyed folds in the batch's one
# transaction.
APPENDED = ("events", "metrics", "utilization", "gpu_utilization")
