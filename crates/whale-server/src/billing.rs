//! API keys, balances and the usage ledger in SQLite (WAL).
//!
//! Money is kept as integer nano-units of the currency (10⁻⁹ CNY): DeepSeek-V2's
//! prices (¥1, ¥0.1 and ¥2 per million tokens) are whole numbers of nano-yuan per
//! token, so every charge and balance is exact. A finished request writes its usage
//! row and its balance deduction in one transaction; granted balance is spent
//! before topped-up balance, as DeepSeek bills.

use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::Mutex;

/// Nano-units per currency unit.
pub const NANO: i64 = 1_000_000_000;

/// Prices in currency units per million tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prices {
    /// Prompt tokens computed (cache miss).
    pub input_miss: f64,
    /// Prompt tokens served from the prefix cache.
    pub input_hit: f64,
    /// Generated tokens.
    pub output: f64,
}

impl Default for Prices {
    /// DeepSeek-V2's list prices (CNY, from 2024-08-02).
    fn default() -> Self {
        Prices {
            input_miss: 1.0,
            input_hit: 0.1,
            output: 2.0,
        }
    }
}

impl Prices {
    /// Cost in nano-units of one request's tokens.
    pub fn cost_nano(&self, hit: u64, miss: u64, completion: u64) -> i64 {
        // price per million tokens × 1e9 nano / 1e6 tokens = price × 1000 nano per token.
        let per = |p: f64| (p * 1000.0).round() as i64;
        per(self.input_hit) * hit as i64
            + per(self.input_miss) * miss as i64
            + per(self.output) * completion as i64
    }
}

/// One API key's record.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyInfo {
    /// The bearer token.
    pub key: String,
    /// A label.
    pub name: String,
    /// Granted (free) balance, nano-units.
    pub granted: i64,
    /// Topped-up balance, nano-units.
    pub topped_up: i64,
    /// No balance is kept or checked (keys from a key file).
    pub unlimited: bool,
    /// Requests per minute (0: no limit).
    pub rpm: u32,
    /// Tokens per minute (0: no limit).
    pub tpm: u32,
}

impl KeyInfo {
    /// Whether the key may start a request.
    pub fn has_balance(&self) -> bool {
        self.unlimited || self.granted + self.topped_up > 0
    }
}

/// A usage row to record.
#[derive(Clone, Debug, Default)]
pub struct UsageRow {
    /// The key billed.
    pub key: String,
    /// Response id.
    pub request_id: String,
    /// Model name as requested.
    pub model: String,
    /// Prompt tokens from the prefix cache.
    pub prompt_cache_hit_tokens: u64,
    /// Prompt tokens computed.
    pub prompt_cache_miss_tokens: u64,
    /// Generated tokens.
    pub completion_tokens: u64,
    /// How it ended (`stop`, `length`, ..., `cancelled`).
    pub finish_reason: String,
}

/// Usage summed over a key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UsageTotal {
    /// The key.
    pub key: String,
    /// Requests.
    pub requests: u64,
    /// Prompt cache-hit tokens.
    pub hit: u64,
    /// Prompt cache-miss tokens.
    pub miss: u64,
    /// Completion tokens.
    pub completion: u64,
    /// Cost, nano-units.
    pub cost: i64,
}

/// The SQLite ledger.
pub struct Ledger {
    conn: Mutex<Connection>,
    prices: Prices,
}

/// Ledger errors.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// SQLite failed.
    #[error("billing database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// No such key.
    #[error("no such API key: {0}")]
    NoKey(String),
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Ledger {
    /// Opens (creating if needed) the database at `path`; `:memory:` for a private one.
    pub fn open(path: &Path, prices: Prices) -> Result<Self, LedgerError> {
        let conn = if path.as_os_str() == ":memory:" {
            Connection::open_in_memory()?
        } else {
            Connection::open(path)?
        };
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS api_keys (
                key TEXT PRIMARY KEY,
                name TEXT NOT NULL DEFAULT '',
                granted_nano INTEGER NOT NULL DEFAULT 0,
                topped_up_nano INTEGER NOT NULL DEFAULT 0,
                unlimited INTEGER NOT NULL DEFAULT 0,
                rpm INTEGER NOT NULL DEFAULT 0,
                tpm INTEGER NOT NULL DEFAULT 0,
                created INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS usage (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                ts INTEGER NOT NULL,
                key TEXT NOT NULL,
                request_id TEXT NOT NULL,
                model TEXT NOT NULL,
                prompt_cache_hit_tokens INTEGER NOT NULL,
                prompt_cache_miss_tokens INTEGER NOT NULL,
                completion_tokens INTEGER NOT NULL,
                cost_nano INTEGER NOT NULL,
                finish_reason TEXT NOT NULL
            );
            CREATE INDEX IF NOT EXISTS usage_key ON usage(key);",
        )?;
        Ok(Ledger {
            conn: Mutex::new(conn),
            prices,
        })
    }

    /// The prices charged.
    pub fn prices(&self) -> Prices {
        self.prices
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a key.
    pub fn add_key(&self, k: &KeyInfo) -> Result<(), LedgerError> {
        self.conn().execute(
            "INSERT INTO api_keys (key, name, granted_nano, topped_up_nano, unlimited, rpm, tpm, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![k.key, k.name, k.granted, k.topped_up, k.unlimited as i64, k.rpm, k.tpm, now_secs()],
        )?;
        Ok(())
    }

    /// Adds a key unless it exists (keys from a key file: unlimited balance).
    pub fn ensure_key(&self, key: &str, name: &str) -> Result<(), LedgerError> {
        self.conn().execute(
            "INSERT OR IGNORE INTO api_keys (key, name, unlimited, created) VALUES (?1, ?2, 1, ?3)",
            params![key, name, now_secs()],
        )?;
        Ok(())
    }

    /// Number of keys.
    pub fn key_count(&self) -> Result<u64, LedgerError> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*) FROM api_keys", [], |r| r.get::<_, i64>(0))?
            as u64)
    }

    /// A key's record.
    pub fn key(&self, key: &str) -> Result<Option<KeyInfo>, LedgerError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT key, name, granted_nano, topped_up_nano, unlimited, rpm, tpm FROM api_keys WHERE key = ?1",
                params![key],
                row_key,
            )
            .optional()?)
    }

    /// Every key.
    pub fn keys(&self) -> Result<Vec<KeyInfo>, LedgerError> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT key, name, granted_nano, topped_up_nano, unlimited, rpm, tpm FROM api_keys ORDER BY created, key",
        )?;
        let rows = st.query_map([], row_key)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Adds `amount_nano` to a key's topped-up balance.
    pub fn top_up(&self, key: &str, amount_nano: i64) -> Result<KeyInfo, LedgerError> {
        let n = self.conn().execute(
            "UPDATE api_keys SET topped_up_nano = topped_up_nano + ?2 WHERE key = ?1",
            params![key, amount_nano],
        )?;
        if n == 0 {
            return Err(LedgerError::NoKey(key.into()));
        }
        self.key(key)?.ok_or_else(|| LedgerError::NoKey(key.into()))
    }

    /// Records one finished request and charges its key, in one transaction.
    /// Returns the cost in nano-units.
    pub fn record(&self, u: &UsageRow) -> Result<i64, LedgerError> {
        let cost = self.prices.cost_nano(
            u.prompt_cache_hit_tokens,
            u.prompt_cache_miss_tokens,
            u.completion_tokens,
        );
        let mut c = self.conn();
        let tx = c.transaction()?;
        tx.execute(
            "INSERT INTO usage (ts, key, request_id, model, prompt_cache_hit_tokens,
                prompt_cache_miss_tokens, completion_tokens, cost_nano, finish_reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                now_secs(),
                u.key,
                u.request_id,
                u.model,
                u.prompt_cache_hit_tokens as i64,
                u.prompt_cache_miss_tokens as i64,
                u.completion_tokens as i64,
                cost,
                u.finish_reason
            ],
        )?;
        // Granted balance first, then topped-up; the latter may go negative by the
        // last request's cost (the request was admitted with a positive balance).
        tx.execute(
            "UPDATE api_keys SET
                topped_up_nano = topped_up_nano - MAX(0, ?2 - MAX(granted_nano, 0)),
                granted_nano = MAX(granted_nano, 0) - MIN(?2, MAX(granted_nano, 0))
             WHERE key = ?1 AND unlimited = 0",
            params![u.key, cost],
        )?;
        tx.commit()?;
        Ok(cost)
    }

    /// Usage summed per key (or for one key).
    pub fn usage(&self, key: Option<&str>) -> Result<Vec<UsageTotal>, LedgerError> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT key, COUNT(*), SUM(prompt_cache_hit_tokens), SUM(prompt_cache_miss_tokens),
                    SUM(completion_tokens), SUM(cost_nano)
             FROM usage WHERE (?1 IS NULL OR key = ?1) GROUP BY key ORDER BY key",
        )?;
        let rows = st.query_map(params![key], |r| {
            Ok(UsageTotal {
                key: r.get(0)?,
                requests: r.get::<_, i64>(1)? as u64,
                hit: r.get::<_, i64>(2)? as u64,
                miss: r.get::<_, i64>(3)? as u64,
                completion: r.get::<_, i64>(4)? as u64,
                cost: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn row_key(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyInfo> {
    Ok(KeyInfo {
        key: r.get(0)?,
        name: r.get(1)?,
        granted: r.get(2)?,
        topped_up: r.get(3)?,
        unlimited: r.get::<_, i64>(4)? != 0,
        rpm: r.get::<_, i64>(5)? as u32,
        tpm: r.get::<_, i64>(6)? as u32,
    })
}

/// Formats nano-units as DeepSeek's balance strings ("110.00").
pub fn money(nano: i64) -> String {
    let cents = (nano as i128 * 100).div_euclid(NANO as i128);
    let sign = if cents < 0 { "-" } else { "" };
    let c = cents.abs();
    format!("{sign}{}.{:02}", c / 100, c % 100)
}

/// Parses an amount ("12.5") into nano-units.
pub fn parse_money(s: &str) -> Option<i64> {
    let v: f64 = s.trim().parse().ok()?;
    v.is_finite().then(|| (v * NANO as f64).round() as i64)
}

/// A new random key, `sk-` and 32 hex digits.
pub fn new_key() -> String {
    let mut r = whale_engine::Rng::from_entropy();
    format!("sk-{:016x}{:016x}", r.next_u64(), r.next_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger() -> Ledger {
        Ledger::open(Path::new(":memory:"), Prices::default()).unwrap()
    }

    #[test]
    fn prices_are_exact_nano_units() {
        let p = Prices::default();
        // 1M miss tokens = ¥1, 1M hit = ¥0.1, 1M output = ¥2.
        assert_eq!(p.cost_nano(0, 1_000_000, 0), NANO);
        assert_eq!(p.cost_nano(1_000_000, 0, 0), NANO / 10);
        assert_eq!(p.cost_nano(0, 0, 1_000_000), 2 * NANO);
        assert_eq!(p.cost_nano(64, 9, 11), 64 * 100 + 9 * 1000 + 11 * 2000);
        assert_eq!(money(110 * NANO), "110.00");
        assert_eq!(money(NANO / 100 - 1), "0.00");
        assert_eq!(money(-NANO / 2), "-0.50");
        assert_eq!(parse_money("12.5"), Some(12 * NANO + NANO / 2));
    }

    #[test]
    fn record_charges_granted_first_in_one_transaction() {
        let l = ledger();
        l.add_key(&KeyInfo {
            key: "sk-a".into(),
            name: "a".into(),
            granted: 5000,
            topped_up: 100_000,
            unlimited: false,
            rpm: 0,
            tpm: 0,
        })
        .unwrap();
        let row = UsageRow {
            key: "sk-a".into(),
            request_id: "r1".into(),
            model: "m".into(),
            prompt_cache_hit_tokens: 0,
            prompt_cache_miss_tokens: 3,
            completion_tokens: 2,
            finish_reason: "stop".into(),
        };
        // 3 × 1000 + 2 × 2000 = 7000: 5000 granted, then 2000 topped up.
        assert_eq!(l.record(&row).unwrap(), 7000);
        let k = l.key("sk-a").unwrap().unwrap();
        assert_eq!((k.granted, k.topped_up), (0, 98_000));
        assert_eq!(l.record(&row).unwrap(), 7000);
        let k = l.key("sk-a").unwrap().unwrap();
        assert_eq!((k.granted, k.topped_up), (0, 91_000));
        let u = l.usage(Some("sk-a")).unwrap();
        assert_eq!(u.len(), 1);
        assert_eq!((u[0].requests, u[0].miss, u[0].cost), (2, 6, 14_000));
        assert!(l.top_up("sk-none", 1).is_err());
        assert_eq!(l.top_up("sk-a", 9000).unwrap().topped_up, 100_000);
    }

    #[test]
    fn unlimited_keys_are_metered_not_charged() {
        let l = ledger();
        l.ensure_key("sk-file", "from file").unwrap();
        l.ensure_key("sk-file", "again").unwrap();
        assert_eq!(l.key_count().unwrap(), 1);
        l.record(&UsageRow {
            key: "sk-file".into(),
            completion_tokens: 5,
            ..Default::default()
        })
        .unwrap();
        let k = l.key("sk-file").unwrap().unwrap();
        assert!(k.unlimited && k.has_balance());
        assert_eq!(k.topped_up, 0);
        assert_eq!(l.usage(None).unwrap()[0].completion, 5);
    }
}
