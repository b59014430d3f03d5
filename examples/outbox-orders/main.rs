//! The seed's `PlaceOrderHandler` with the transactional outbox: the order row and its
//! `OrderPlaced` event are written in one database transaction; a dispatcher delivers the
//! event after the commit. A rolled-back order publishes nothing.
//!
//! Run with `cargo run --example outbox-orders --features outbox` (SQLite file in a
//! temporary directory), or with
//! `DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run --example outbox-orders --features outbox`.

use std::time::Duration;

use busway::BoxError;
use busway::outbox::sqlx::{self, PgPool, SqlitePool};
use busway::outbox::{Outbox, PostgresStore, SqliteStore};
use busway::prelude::*;
use busway_examples::OrderPlaced;
use chrono::Utc;
use rust_decimal::Decimal;
use tokio::sync::mpsc;
use uuid::Uuid;

/// Where orders live.
enum Database {
    Postgres(PgPool, Outbox<PostgresStore>),
    Sqlite(SqlitePool, Outbox<SqliteStore>),
}

/// The application service: save the order and its event in one transaction.
struct PlaceOrderHandler {
    db: Database,
}

impl PlaceOrderHandler {
    async fn handle(
        &self,
        customer_id: Uuid,
        total: Decimal,
        fail_before_commit: bool,
    ) -> Result<Uuid, BoxError> {
        let order_id = Uuid::now_v7();
        let event = OrderPlaced {
            order_id,
            customer_id,
            total,
            occurred_at: Utc::now(),
        };
        match &self.db {
            Database::Postgres(pool, outbox) => {
                let mut tx = pool.begin().await?;
                sqlx::query("INSERT INTO orders (id, customer_id, total) VALUES ($1, $2, $3)")
                    .bind(order_id)
                    .bind(customer_id)
                    .bind(total.to_string())
                    .execute(&mut *tx)
                    .await?;
                outbox.publish(&mut tx, event).await?;
                if fail_before_commit {
                    tx.rollback().await?;
                    return Err("payment declined; the order and its event were rolled back".into());
                }
                tx.commit().await?;
            }
            Database::Sqlite(pool, outbox) => {
                let mut tx = pool.begin().await?;
                sqlx::query("INSERT INTO orders (id, customer_id, total) VALUES (?, ?, ?)")
                    .bind(order_id.to_string())
                    .bind(customer_id.to_string())
                    .bind(total.to_string())
                    .execute(&mut *tx)
                    .await?;
                outbox.publish(&mut tx, event).await?;
                if fail_before_commit {
                    tx.rollback().await?;
                    return Err("payment declined; the order and its event were rolled back".into());
                }
                tx.commit().await?;
                outbox.notify();
            }
        }
        Ok(order_id)
    }

    async fn order_count(&self) -> Result<i64, BoxError> {
        Ok(match &self.db {
            Database::Postgres(pool, _) => {
                sqlx::query_scalar("SELECT COUNT(*) FROM orders")
                    .fetch_one(pool)
                    .await?
            }
            Database::Sqlite(pool, _) => {
                sqlx::query_scalar("SELECT COUNT(*) FROM orders")
                    .fetch_one(pool)
                    .await?
            }
        })
    }
}

struct SendConfirmationEmail(mpsc::UnboundedSender<Uuid>);

impl Consumer<OrderPlaced> for SendConfirmationEmail {
    async fn consume(&self, ctx: &ConsumeContext<OrderPlaced>) -> Result<(), ConsumeError> {
        println!(
            "  SendConfirmationEmail: order {} (total {})",
            ctx.message().order_id,
            ctx.message().total
        );
        let _ = self.0.send(ctx.message().order_id);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    let (tx, mut confirmed) = mpsc::unbounded_channel();
    let bus = Bus::builder()
        .consumer(SendConfirmationEmail(tx))
        .build()
        .await?;
    let running = bus.start().await?;

    let url = std::env::var("DATABASE_URL").unwrap_or_default();
    let mut cleanup = None;
    let (db, dispatcher, where_) = if url.starts_with("postgres") {
        let pool = PgPool::connect(&url).await?;
        sqlx::query("CREATE TABLE IF NOT EXISTS orders (id UUID PRIMARY KEY, customer_id UUID NOT NULL, total TEXT NOT NULL)")
            .execute(&pool)
            .await?;
        let outbox = Outbox::new(PostgresStore::new(pool.clone()), &bus).await?;
        let dispatcher = outbox.start_dispatcher();
        (
            Database::Postgres(pool, outbox),
            dispatcher,
            format!("PostgreSQL ({url})"),
        )
    } else {
        let dir = std::env::temp_dir().join(format!("busway-outbox-orders-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("orders.db");
        cleanup = Some(dir.clone());
        let pool = SqlitePool::connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .busy_timeout(Duration::from_secs(10)),
        )
        .await?;
        sqlx::query("CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, total TEXT NOT NULL)")
            .execute(&pool)
            .await?;
        let outbox = Outbox::new(SqliteStore::new(pool.clone()), &bus).await?;
        let dispatcher = outbox.start_dispatcher();
        (
            Database::Sqlite(pool, outbox),
            dispatcher,
            format!("SQLite ({})", path.display()),
        )
    };
    println!("orders and the outbox in {where_}");
    let handler = PlaceOrderHandler { db };
    let before = handler.order_count().await?;

    println!("1. place an order: the row and OrderPlaced commit together");
    let order_id = handler
        .handle(Uuid::now_v7(), Decimal::new(4250, 2), false)
        .await?;
    let delivered = tokio::time::timeout(Duration::from_secs(10), confirmed.recv())
        .await
        .map_err(|_| "the event was not delivered within 10 s")?;
    if delivered != Some(order_id) {
        return Err("a different order was confirmed".into());
    }
    println!("  the dispatcher delivered OrderPlaced for {order_id} after the commit");

    println!("2. an order whose transaction rolls back");
    match handler
        .handle(Uuid::now_v7(), Decimal::new(999, 0), true)
        .await
    {
        Err(e) => println!("  {e}"),
        Ok(_) => return Err("the failing order committed".into()),
    }
    if let Ok(Some(id)) = tokio::time::timeout(Duration::from_secs(1), confirmed.recv()).await {
        return Err(format!("the rolled-back order {id} was published").into());
    }
    println!("  nothing was published for it");
    println!(
        "  orders stored by this run: {}",
        handler.order_count().await? - before
    );

    dispatcher.stop().await;
    running.shutdown().await?;
    if let Some(dir) = cleanup {
        let _ = std::fs::remove_dir_all(dir);
    }
    println!("done");
    Ok(())
}
