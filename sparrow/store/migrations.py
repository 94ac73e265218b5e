"""The schema, as numbered migrations: one list per database.

SQLite: ``PRAGMA user_version`` records how many have run; the missing ones run
in order inside one transaction with the version bump, with foreign keys off (so
that a table can be rebuilt, SQLite's way of changing a constraint) and checked
before the commit. PostgreSQL: the table ``schema_version`` records it; the
missing ones run in one transaction under an advisory lock. PostgreSQL's list
starts at the schema SQLite reached in its fourth migration, so its numbers are
its own; a change to the schema appends one migration to each list.

The two schemas hold the same tables, columns and constraints. PostgreSQL's
tables add an identity column ``rowid`` (SQLite has one implicitly), its reals
are double precision and its counters 64-bit. Never edit a released migration:
append a new one.
"""

from __future__ import annotations

from collections.abc import Callable


def procrastinate_schema() -> str:
    """procrastinate's tables and functions (its version is pinned: its schema is part of
    ours, and a new version's migration scripts would be appended here)."""
    from procrastinate.schema import SchemaManager

    return SchemaManager.get_schema()


SQLITE_MIGRATIONS: list[str] = [
    # 1: chains and the node tree.
    """
    CREATE TABLE chains (
        id            TEXT PRIMARY KEY,
        title         TEXT NOT NULL,
        owner         TEXT,
        root_node_id  TEXT NOT NULL,
        created_at    TEXT NOT NULL,
        updated_at    TEXT NOT NULL
    );
    CREATE INDEX chains_created ON chains (created_at DESC);
    CREATE INDEX chains_owner ON chains (owner, created_at DESC);

    CREATE TABLE nodes (
        id            TEXT PRIMARY KEY,
        chain_id      TEXT NOT NULL REFERENCES chains (id) ON DELETE CASCADE,
        parent_id     TEXT REFERENCES nodes (id) ON DELETE CASCADE,
        kind          TEXT NOT NULL CHECK (kind IN ('upload', 'continuation')),
        status        TEXT NOT NULL
                      CHECK (status IN ('queued', 'generating', 'ready', 'error', 'cancelled')),
        committed     INTEGER NOT NULL DEFAULT 0 CHECK (committed IN (0, 1)),
        duration_s    REAL,
        sample_rate   INTEGER,
        channels      INTEGER,
        frames        INTEGER,
        prompt        TEXT,
        params        TEXT,            -- JSON object, or NULL for uploads
        error         TEXT,            -- JSON {code, detail}, or NULL
        audio_sha256  TEXT,
        created_at    TEXT NOT NULL,
        updated_at    TEXT NOT NULL,
        -- A root is committed; only a root has no parent.
        CHECK (parent_id IS NOT NULL OR committed = 1)
    );
    CREATE INDEX nodes_chain ON nodes (chain_id, created_at);
    CREATE INDEX nodes_parent ON nodes (parent_id);
    -- The spine's shape, enforced by the database: at most one committed child per node.
    CREATE UNIQUE INDEX nodes_one_committed_child ON nodes (parent_id) WHERE committed = 1;
    """,
    # 2: the per-chain event log and the durable job queue.
    """
    ALTER TABLE chains ADD COLUMN last_event_id INTEGER NOT NULL DEFAULT 0;

    -- Every event a chain's subscribers see, with a per-chain increasing id
    -- (chains.last_event_id is the counter). Old events are pruned past the
    -- configured retention; a client asking for a pruned id gets a reset.
    CREATE TABLE events (
        chain_id      TEXT NOT NULL REFERENCES chains (id) ON DELETE CASCADE,
        id            INTEGER NOT NULL,
        type          TEXT NOT NULL,
        data          TEXT NOT NULL,   -- JSON object
        created_at    TEXT NOT NULL,
        PRIMARY KEY (chain_id, id)
    ) WITHOUT ROWID;

    -- Work waiting for, or held by, the worker. A row lives from the request
    -- until the job ends; its outcome is recorded on its nodes.
    CREATE TABLE jobs (
        id            TEXT PRIMARY KEY,
        chain_id      TEXT NOT NULL REFERENCES chains (id) ON DELETE CASCADE,
        kind          TEXT NOT NULL,
        status        TEXT NOT NULL CHECK (status IN ('queued', 'running')),
        owner         TEXT,
        request       TEXT NOT NULL,   -- JSON object: what the job needs besides its nodes
        created_at    TEXT NOT NULL,
        started_at    TEXT
    );
    CREATE INDEX jobs_queue ON jobs (status, created_at);

    ALTER TABLE nodes ADD COLUMN job_id TEXT REFERENCES jobs (id) ON DELETE SET NULL;
    CREATE INDEX nodes_job ON nodes (job_id) WHERE job_id IS NOT NULL;
    """,
    # 3: API keys, and the stems of nodes.
    """
    -- Keys are stored only as the SHA-256 of the key; the key itself is shown once.
    CREATE TABLE api_keys (
        id            TEXT PRIMARY KEY,
        name          TEXT NOT NULL,
        tier          TEXT NOT NULL CHECK (tier IN ('free', 'paid')),
        key_hash      TEXT NOT NULL UNIQUE,
        created_at    TEXT NOT NULL
    );

    -- One row per node whose stems were asked for; the files exist once 'ready'.
    CREATE TABLE stems (
        node_id       TEXT PRIMARY KEY REFERENCES nodes (id) ON DELETE CASCADE,
        chain_id      TEXT NOT NULL REFERENCES chains (id) ON DELETE CASCADE,
        status        TEXT NOT NULL
                      CHECK (status IN ('queued', 'separating', 'ready', 'error', 'cancelled')),
        job_id        TEXT REFERENCES jobs (id) ON DELETE SET NULL,
        model         TEXT,
        sample_rate   INTEGER,
        channels      INTEGER,
        frames        INTEGER,
        files         TEXT,            -- JSON {stem: sha256} once ready
        error         TEXT,            -- JSON {code, detail}, or NULL
        created_at    TEXT NOT NULL,
        updated_at    TEXT NOT NULL
    );
    CREATE INDEX stems_chain ON stems (chain_id);
    CREATE INDEX stems_job ON stems (job_id) WHERE job_id IS NOT NULL;
    CREATE INDEX jobs_owner ON jobs (owner, status);
    """,
    # 4: the tree without a recursive cascade, the event log's size, readiness probes.
    """
    -- A cascade through parent_id recurses once per level, and SQLite stops at 1,000
    -- levels: a deep chain could never be deleted. Subtrees are deleted by their ids in
    -- one statement instead (checked at its end), so parent_id has no ON DELETE action.
    CREATE TABLE nodes_rebuilt (
        id            TEXT PRIMARY KEY,
        chain_id      TEXT NOT NULL REFERENCES chains (id) ON DELETE CASCADE,
        parent_id     TEXT REFERENCES nodes (id),
        kind          TEXT NOT NULL CHECK (kind IN ('upload', 'continuation')),
        status        TEXT NOT NULL
                      CHECK (status IN ('queued', 'generating', 'ready', 'error', 'cancelled')),
        committed     INTEGER NOT NULL DEFAULT 0 CHECK (committed IN (0, 1)),
        duration_s    REAL,
        sample_rate   INTEGER,
        channels      INTEGER,
        frames        INTEGER,
        prompt        TEXT,
        params        TEXT,
        error         TEXT,
        audio_sha256  TEXT,
        created_at    TEXT NOT NULL,
        updated_at    TEXT NOT NULL,
        job_id        TEXT REFERENCES jobs (id) ON DELETE SET NULL,
        CHECK (parent_id IS NOT NULL OR committed = 1)
    );
    INSERT INTO nodes_rebuilt (
        id, chain_id, parent_id, kind, status, committed, duration_s, sample_rate, channels,
        frames, prompt, params, error, audio_sha256, created_at, updated_at, job_id
    )
    SELECT id, chain_id, parent_id, kind, status, committed, duration_s, sample_rate, channels,
           frames, prompt, params, error, audio_sha256, created_at, updated_at, job_id
    FROM nodes ORDER BY rowid;
    DROP TABLE nodes;
    ALTER TABLE nodes_rebuilt RENAME TO nodes;
    CREATE INDEX nodes_chain ON nodes (chain_id, created_at);
    CREATE INDEX nodes_parent ON nodes (parent_id);
    CREATE UNIQUE INDEX nodes_one_committed_child ON nodes (parent_id) WHERE committed = 1;
    CREATE INDEX nodes_job ON nodes (job_id) WHERE job_id IS NOT NULL;

    -- The bytes of each chain's retained events, so the log is bounded in size too.
    ALTER TABLE chains ADD COLUMN event_log_bytes INTEGER NOT NULL DEFAULT 0;
    UPDATE chains SET event_log_bytes = (
        SELECT coalesce(sum(length(CAST(data AS BLOB))), 0) FROM events WHERE chain_id = chains.id
    );

    -- One row that /readyz rewrites: proof that the database takes writes.
    CREATE TABLE probes (
        id            INTEGER PRIMARY KEY CHECK (id = 1),
        at            TEXT NOT NULL
    );
    """,
    # 5: how many times a job was started (a worker that dies under it costs one).
    """
    ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    """,
    # 6: where a node continues its parent from (SPEC §12; the parent's end for the nodes
    # before it), and each ready node's analysis (JSON) with its claim by an analyser.
    """
    ALTER TABLE nodes ADD COLUMN from_s REAL;
    ALTER TABLE nodes ADD COLUMN analysis TEXT;
    ALTER TABLE nodes ADD COLUMN analysis_claimed_at TEXT;
    UPDATE nodes SET from_s = (SELECT p.duration_s FROM nodes AS p WHERE p.id = nodes.parent_id)
        WHERE parent_id IS NOT NULL;
    CREATE INDEX nodes_unanalysed ON nodes (created_at)
        WHERE status = 'ready' AND analysis IS NULL;
    """,
    # 7: the list's indexes in its order. Read backwards, (created_at) and its implicit
    # rowid give ORDER BY created_at DESC, rowid DESC with no sort; a DESC index would
    # leave the ties to a temporary b-tree.
    """
    DROP INDEX chains_created;
    DROP INDEX chains_owner;
    CREATE INDEX chains_created ON chains (created_at);
    CREATE INDEX chains_owner ON chains (owner, created_at);
    """,
]


POSTGRES_MIGRATIONS: list[str | Callable[[], str]] = [
    # 1: everything SQLite's migrations 1-4 built.
    """
    CREATE TABLE chains (
        id              TEXT PRIMARY KEY,
        title           TEXT NOT NULL,
        owner           TEXT,
        root_node_id    TEXT NOT NULL,
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        last_event_id   BIGINT NOT NULL DEFAULT 0,
        event_log_bytes BIGINT NOT NULL DEFAULT 0,
        rowid           BIGINT GENERATED ALWAYS AS IDENTITY
    );
    CREATE INDEX chains_created ON chains (created_at DESC);
    CREATE INDEX chains_owner ON chains (owner, created_at DESC);

    CREATE TABLE events (
        chain_id      TEXT NOT NULL REFERENCES chains (id) ON DELETE CASCADE,
        id            BIGINT NOT NULL,
        type          TEXT NOT NULL,
        data          TEXT NOT NULL,
        created_at    TEXT NOT NULL,
        PRIMARY KEY (chain_id, id)
    );

    CREATE TABLE jobs (
        id            TEXT PRIMARY KEY,
        chain_id      TEXT NOT NULL REFERENCES chains (id) ON DELETE CASCADE,
        kind          TEXT NOT NULL,
        status        TEXT NOT NULL CHECK (status IN ('queued', 'running')),
        owner         TEXT,
        request       TEXT NOT NULL,
        created_at    TEXT NOT NULL,
        started_at    TEXT,
        rowid         BIGINT GENERATED ALWAYS AS IDENTITY
    );
    CREATE INDEX jobs_queue ON jobs (status, created_at);
    CREATE INDEX jobs_owner ON jobs (owner, status);

    CREATE TABLE nodes (
        id            TEXT PRIMARY KEY,
        chain_id      TEXT NOT NULL REFERENCES chains (id) ON DELETE CASCADE,
        parent_id     TEXT REFERENCES nodes (id),
        kind          TEXT NOT NULL CHECK (kind IN ('upload', 'continuation')),
        status        TEXT NOT NULL
                      CHECK (status IN ('queued', 'generating', 'ready', 'error', 'cancelled')),
        committed     INTEGER NOT NULL DEFAULT 0 CHECK (committed IN (0, 1)),
        duration_s    DOUBLE PRECISION,
        sample_rate   INTEGER,
        channels      INTEGER,
        frames        BIGINT,
        prompt        TEXT,
        params        TEXT,
        error         TEXT,
        audio_sha256  TEXT,
        created_at    TEXT NOT NULL,
        updated_at    TEXT NOT NULL,
        job_id        TEXT REFERENCES jobs (id) ON DELETE SET NULL,
        rowid         BIGINT GENERATED ALWAYS AS IDENTITY,
        CHECK (parent_id IS NOT NULL OR committed = 1)
    );
    CREATE INDEX nodes_chain ON nodes (chain_id, created_at);
    CREATE INDEX nodes_parent ON nodes (parent_id);
    CREATE UNIQUE INDEX nodes_one_committed_child ON nodes (parent_id) WHERE committed = 1;
    CREATE INDEX nodes_job ON nodes (job_id) WHERE job_id IS NOT NULL;

    CREATE TABLE api_keys (
        id            TEXT PRIMARY KEY,
        name          TEXT NOT NULL,
        tier          TEXT NOT NULL CHECK (tier IN ('free', 'paid')),
        key_hash      TEXT NOT NULL UNIQUE,
        created_at    TEXT NOT NULL,
        rowid         BIGINT GENERATED ALWAYS AS IDENTITY
    );

    CREATE TABLE stems (
        node_id       TEXT PRIMARY KEY REFERENCES nodes (id) ON DELETE CASCADE,
        chain_id      TEXT NOT NULL REFERENCES chains (id) ON DELETE CASCADE,
        status        TEXT NOT NULL
                      CHECK (status IN ('queued', 'separating', 'ready', 'error', 'cancelled')),
        job_id        TEXT REFERENCES jobs (id) ON DELETE SET NULL,
        model         TEXT,
        sample_rate   INTEGER,
        channels      INTEGER,
        frames        BIGINT,
        files         TEXT,
        error         TEXT,
        created_at    TEXT NOT NULL,
        updated_at    TEXT NOT NULL,
        rowid         BIGINT GENERATED ALWAYS AS IDENTITY
    );
    CREATE INDEX stems_chain ON stems (chain_id);
    CREATE INDEX stems_job ON stems (job_id) WHERE job_id IS NOT NULL;

    CREATE TABLE probes (
        id            INTEGER PRIMARY KEY CHECK (id = 1),
        at            TEXT NOT NULL
    );
    """,
    # 2: job attempts (as SQLite's 5), the workers, and procrastinate's queue.
    """
    ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN worker_id TEXT;

    -- Every sparrow worker process, as GET /api/gpu lists them. A row not seen for
    -- SPARROW_WORKER_STALL_S belongs to a dead worker and is removed.
    CREATE TABLE workers (
        id            TEXT PRIMARY KEY,
        host          TEXT NOT NULL,
        device        TEXT NOT NULL,
        engine        TEXT NOT NULL,
        model         TEXT NOT NULL,
        loaded        BOOLEAN NOT NULL DEFAULT FALSE,
        job_id        TEXT,
        progress      DOUBLE PRECISION,  -- of its running job, 0..1
        started_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
        seen_at       TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    """,
    procrastinate_schema,
    # 3: as SQLite's 6.
    """
    ALTER TABLE nodes ADD COLUMN from_s DOUBLE PRECISION;
    ALTER TABLE nodes ADD COLUMN analysis TEXT;
    ALTER TABLE nodes ADD COLUMN analysis_claimed_at TEXT;
    UPDATE nodes SET from_s = (SELECT p.duration_s FROM nodes AS p WHERE p.id = nodes.parent_id)
        WHERE parent_id IS NOT NULL;
    CREATE INDEX nodes_unanalysed ON nodes (created_at)
        WHERE status = 'ready' AND analysis IS NULL;
    """,
    # 4: a worker runs several jobs at once, their rows in one batch: JSON
    # [[job_id, progress], …]. job_id and progress keep the first, for older replicas.
    """
    ALTER TABLE workers ADD COLUMN jobs TEXT NOT NULL DEFAULT '[]';
    """,
    # 5: as SQLite's 7, the rowid named (it is a column of its own here).
    """
    DROP INDEX chains_created;
    DROP INDEX chains_owner;
    CREATE INDEX chains_created ON chains (created_at, rowid);
    CREATE INDEX chains_owner ON chains (owner, created_at, rowid);
    """,
]
