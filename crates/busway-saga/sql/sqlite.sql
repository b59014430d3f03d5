-- A busway saga table on SQLite, as SqliteSagaRepository::create_schema makes it.
-- Replace order_state with the table you give SqliteSagaRepository::new.
CREATE TABLE IF NOT EXISTS order_state (
    correlation_id BLOB PRIMARY KEY,  -- the UUID's 16 bytes, as sqlx binds a Uuid
    current_state TEXT NOT NULL,
    version INTEGER NOT NULL,          -- every write checks it
    meta TEXT NOT NULL DEFAULT '{}',   -- composite progress, schedule tokens, pending requests
    data TEXT NOT NULL,                -- the state type as serde_json writes it
    created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
