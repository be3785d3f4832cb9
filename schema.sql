-- wav2mp3 schema: applied at every start-up, so every statement is idempotent.
-- The service splits this file on semicolons: keep them out of comments.
-- Portable: the same text runs on SQLite and PostgreSQL. UUIDs and timestamps (ISO 8601,
-- UTC) are TEXT, BYTEA is PostgreSQL's binary type, and SQLite stores the bytes as a BLOB.

CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL,  -- the access token itself is shown once and never stored
    created_at TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    filename TEXT NOT NULL,  -- the uploaded file's name as sent, directories stripped
    size_bytes BIGINT NOT NULL,  -- of the MP3
    duration_seconds DOUBLE PRECISION NOT NULL,
    sha256 TEXT NOT NULL,  -- of the MP3, also its ETag
    created_at TEXT NOT NULL,
    UNIQUE (user_id, filename)
);

-- The MP3 in 256 KiB pieces, GridFS style: a download or a Range reads only the pieces it needs.
CREATE TABLE IF NOT EXISTS record_chunks (
    record_id TEXT NOT NULL REFERENCES records (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (record_id, seq)
);

-- A record's title (the TIT2 of its MP3's tag), when it has one, written in the record's transaction. A table
-- of its own, not a column of records: this file is applied at every start-up, and a column added to a table
-- that exists is no idempotent statement on SQLite (ALTER TABLE ... ADD COLUMN has no IF NOT EXISTS).
CREATE TABLE IF NOT EXISTS record_titles (
    record_id TEXT PRIMARY KEY REFERENCES records (id) ON DELETE CASCADE,
    title TEXT NOT NULL  -- at most 1,024 characters (MAX_TITLE_CHARS)
);

-- A user's records newest first, a page at a time (keyset pagination on created_at, id).
CREATE INDEX IF NOT EXISTS records_by_owner_and_time ON records (user_id, created_at, id);

-- A resumable upload (tus). Creating one reserves its file name for the user until it completes (its
-- record_id is set), is terminated or expires (the row is deleted). `received` counts the bytes stored
-- in upload_chunks: what a HEAD acknowledges, and where any replica goes on after a restart.
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    filename TEXT NOT NULL,  -- as sent, directories stripped: the record's name
    options TEXT NOT NULL,  -- the encoding options given at creation, a JSON object
    length BIGINT NOT NULL,  -- Upload-Length
    received BIGINT NOT NULL,  -- bytes stored so far
    record_id TEXT,  -- the record, once the upload is complete
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    metadata TEXT NOT NULL  -- Upload-Metadata as sent, which a HEAD gives back
);

CREATE INDEX IF NOT EXISTS uploads_by_owner_and_name ON uploads (user_id, filename);
CREATE INDEX IF NOT EXISTS uploads_by_expiry ON uploads (expires_at);

-- The WAV bytes of unfinished uploads, as they arrived (a piece per store, up to 256 KiB). No foreign key:
-- finishing, terminating or expiring an upload only touches its row, and the storage sweep deletes the
-- bytes of uploads that are gone or complete afterwards, a few pieces per transaction.
CREATE TABLE IF NOT EXISTS upload_chunks (
    upload_id TEXT NOT NULL,
    start BIGINT NOT NULL,  -- the file offset of its first byte
    data BYTEA NOT NULL,
    PRIMARY KEY (upload_id, start)
);

-- Invite codes (SIGNUP=invite), made by the operator: each creates up to `uses_left` more users until it
-- expires. The code itself is shown once and never stored.
CREATE TABLE IF NOT EXISTS invites (
    code_sha256 TEXT PRIMARY KEY,
    uses_left INTEGER NOT NULL,
    expires_at TEXT NOT NULL,
    created_at TEXT NOT NULL
);

-- A user's own storage quota, set by the operator over USER_QUOTA_MB (quota_bytes NULL: unlimited).
CREATE TABLE IF NOT EXISTS quotas (
    user_id TEXT PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    quota_bytes BIGINT
);

-- A user's usage (quota checks, GET /users/{id}) from indexes alone: the sizes of its records, and its
-- unfinished uploads with what they declared and hold.
CREATE INDEX IF NOT EXISTS records_by_owner_and_size ON records (user_id, size_bytes);
CREATE INDEX IF NOT EXISTS unfinished_uploads_by_owner ON uploads (user_id, expires_at, length, received) WHERE record_id IS NULL;
