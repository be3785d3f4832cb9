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

-- A user's records newest first, a page at a time (keyset pagination on created_at, id).
CREATE INDEX IF NOT EXISTS records_by_owner_and_time ON records (user_id, created_at, id);
