//! Helpers for tests against PostgreSQL and SQLite.

use std::net::TcpStream;
use std::time::Duration;

use busway::outbox::sqlx;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

/// The PostgreSQL URL for tests: `DATABASE_URL` when it names PostgreSQL, else the local
/// `test` database.
pub fn postgres_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| u.starts_with("postgres"))
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// Panics with how to start PostgreSQL when the local one is down.
pub fn require_postgres() {
    crate::support::start_watchdog();
    let reachable = "127.0.0.1:5432"
        .parse()
        .map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
        .unwrap_or(false);
    assert!(
        reachable || !postgres_url().contains("127.0.0.1:5432"),
        "PostgreSQL is not reachable at 127.0.0.1:5432. Start it with \
         `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` \
         (or `scripts/services`, or `docker compose up -d postgres`)."
    );
}

/// A pool on the test database; panics with how to start PostgreSQL when it is down.
pub async fn postgres_pool() -> PgPool {
    require_postgres();
    PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&postgres_url())
        .await
        .unwrap_or_else(|e| panic!("could not connect to PostgreSQL at {}: {e}", postgres_url()))
}

/// A SQLite database file in a fresh temporary directory (kept until the value is dropped).
#[derive(Debug)]
pub struct SqliteFile {
    dir: std::path::PathBuf,
}

impl SqliteFile {
    /// A new, empty database directory.
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(crate::support::unique(&format!("busway-{tag}")));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        Self { dir }
    }

    /// A pool on the database file (WAL, a busy timeout so writers queue).
    pub async fn pool(&self) -> SqlitePool {
        let options = SqliteConnectOptions::new()
            .filename(self.dir.join("test.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(30));
        SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .expect("a SQLite pool")
    }
}

impl Drop for SqliteFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The Redis URL for tests: `BUSWAY_REDIS_URL` or the local server.
pub fn redis_url() -> String {
    std::env::var("BUSWAY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// Panics with how to start Redis when the local one is down.
pub fn require_redis() {
    crate::support::start_watchdog();
    let reachable = "127.0.0.1:6379"
        .parse()
        .map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
        .unwrap_or(false);
    assert!(
        reachable || !redis_url().contains("127.0.0.1:6379"),
        "Redis is not reachable at 127.0.0.1:6379. Start it with `redis-server --daemonize yes \
         --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no` (or `scripts/services`)."
    );
}
