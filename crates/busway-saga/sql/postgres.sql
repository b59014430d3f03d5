-- A busway saga table on PostgreSQL, as PostgresSagaRepository::create_schema makes it.
-- Replace order_state with the table you give PostgresSagaRepository::new.
CREATE TABLE IF NOT EXISTS order_state (
    correlation_id UUID PRIMARY KEY,
    -- the state's name: Initial, Final or one the machine declares
    current_state TEXT NOT NULL,
    -- 1 after the first save, one more after each; every write checks it
    version BIGINT NOT NULL,
    -- composite event progress and schedule tokens
    meta JSONB NOT NULL DEFAULT '{}',
    -- the state type's fields, as serde_json writes them
    data JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
