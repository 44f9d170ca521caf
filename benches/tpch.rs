//! Embedded DataFusion on TPC-H Parquet files: the engine alone, which the
//! end-to-end harness (`benches/e2e/run`) sets beside meshgate and DuckDB.
//!
//! ```text
//! cargo bench --bench tpch -- --data DIR --queries DIR [--runs N]
//!     [--settings default|meshgate] [--set datafusion.key=value]
//!     [--only q1,q6] [--json FILE] [--setup FILE] [--explain] [--serve]
//! ```
//!
//! `--setup FILE` replaces the registration of the eight tables by the SQL
//! statements in FILE (one per line), for example views that apply access
//! policies written by hand.
//!
//! `--settings default` is `SessionContext::new()`; `meshgate` is the engine
//! configuration meshgate runs every query with. Each query is planned and
//! run to completion `--runs` times after one warm-up run; the times (ms) and
//! row counts are printed and written as JSON. `--explain` prints each
//! query's physical plan instead (with `--set
//! datafusion.explain.show_statistics=true`, the estimates the plan was
//! chosen by).
//!
//! `--serve` runs queries on request, for a harness that interleaves
//! engines query by query: it reads query names from standard input, one
//! per line, runs each once and answers with one JSON line,
//! `{"query": …, "ms": …, "rows": …}` (or `{"query": …, "error": …}`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};

/// The allocator the meshgate binary runs with, configured as it configures
/// it in `main`, so that the engine alone is measured on equal terms.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TABLES: [&str; 8] = [
    "lineitem", "orders", "customer", "nation", "region", "part", "partsupp", "supplier",
];

struct Args {
    data: PathBuf,
    queries: PathBuf,
    runs: usize,
    settings: String,
    only: Option<Vec<String>>,
    json: Option<PathBuf>,
    /// `key=value` DataFusion options set over `settings`.
    set: Vec<(String, String)>,
    setup: Option<PathBuf>,
    explain: bool,
    serve: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut data = None;
    let mut queries = None;
    let mut runs = 3;
    let mut settings = "meshgate".to_string();
    let mut only = None;
    let mut json = None;
    let mut set = Vec::new();
    let mut setup = None;
    let mut explain = false;
    let mut serve = false;
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--data" => data = Some(PathBuf::from(value()?)),
            "--queries" => queries = Some(PathBuf::from(value()?)),
            "--runs" => runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--settings" => settings = value()?,
            "--only" => only = Some(value()?.split(',').map(str::to_string).collect()),
            "--json" => json = Some(PathBuf::from(value()?)),
            "--setup" => setup = Some(PathBuf::from(value()?)),
            "--explain" => explain = true,
            "--serve" => serve = true,
            "--set" => {
                let pair = value()?;
                let (key, value) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("--set takes key=value, not {pair}"))?;
                set.push((key.to_string(), value.to_string()));
            }
            // `cargo bench` passes --bench to every bench binary.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        data: data.ok_or("--data DIR is required")?,
        queries: queries.ok_or("--queries DIR is required")?,
        runs,
        settings,
        only,
        json,
        set,
        setup,
        explain,
        serve,
    })
}

fn config(settings: &str) -> Result<SessionConfig, String> {
    match settings {
        "default" => Ok(SessionConfig::new()),
        "meshgate" => Ok(meshgate::query::engine_config()),
        other => Err(format!("--settings is default or meshgate, not {other}")),
    }
}

async fn context(args: &Args) -> Result<SessionContext, String> {
    let mut config = config(&args.settings)?;
    for (key, value) in &args.set {
        config
            .options_mut()
            .set(key, value)
            .map_err(|e| format!("--set {key}: {e}"))?;
    }
    let context = SessionContext::new_with_config(config);
    if let Some(path) = &args.setup {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for statement in text.lines().filter(|line| !line.trim().is_empty()) {
            context
                .sql(statement)
                .await
                .map_err(|e| format!("{statement}: {e}"))?
                .collect()
                .await
                .map_err(|e| format!("{statement}: {e}"))?;
        }
        return Ok(context);
    }
    for table in TABLES {
        let path = args.data.join(format!("{table}.parquet"));
        context
            .register_parquet(
                table,
                path.to_string_lossy().as_ref(),
                ParquetReadOptions::default(),
            )
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(context)
}

fn query_text(dir: &Path, name: &str) -> Result<String, String> {
    let path = dir.join(format!("{name}.sql"));
    std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
}

async fn run_once(context: &SessionContext, sql: &str) -> Result<(f64, usize), String> {
    let start = Instant::now();
    let batches = context
        .sql(sql)
        .await
        .map_err(|e| e.to_string())?
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let elapsed = start.elapsed().as_secs_f64() * 1000.0;
    Ok((elapsed, batches.iter().map(|b| b.num_rows()).sum()))
}

/// The physical plan DataFusion would run `sql` with.
async fn explain(context: &SessionContext, sql: &str) -> Result<String, String> {
    let frame = context.sql(sql).await.map_err(|e| e.to_string())?;
    let plan = frame
        .create_physical_plan()
        .await
        .map_err(|e| e.to_string())?;
    let statistics = context.state().config_options().explain.show_statistics;
    Ok(datafusion::physical_plan::displayable(plan.as_ref())
        .set_show_statistics(statistics)
        .indent(true)
        .to_string())
}

/// Answers the query names read from standard input until it closes.
async fn serve(context: &SessionContext, queries: &Path) -> Result<(), String> {
    use std::io::{BufRead, Write};
    let mut answers = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let name = line.map_err(|e| format!("standard input: {e}"))?;
        let name = name.trim();
        let outcome = match query_text(queries, name) {
            Ok(sql) => run_once(context, &sql).await,
            Err(message) => Err(message),
        };
        let answer = match outcome {
            Ok((ms, rows)) => serde_json::json!({ "query": name, "ms": ms, "rows": rows }),
            Err(error) => serde_json::json!({ "query": name, "error": error }),
        };
        writeln!(answers, "{answer}")
            .and_then(|()| answers.flush())
            .map_err(|e| format!("standard output: {e}"))?;
    }
    Ok(())
}

async fn run(args: Args) -> Result<(), String> {
    let context = context(&args).await?;
    if args.serve {
        return serve(&context, &args.queries).await;
    }
    let names: Vec<String> = match &args.only {
        Some(only) => only.clone(),
        None => (1..=22).map(|n| format!("q{n}")).collect(),
    };
    let mut results = serde_json::Map::new();
    for name in &names {
        let sql = query_text(&args.queries, name)?;
        if args.explain {
            let plan = explain(&context, &sql)
                .await
                .map_err(|e| format!("{name}: {e}"))?;
            println!("-- {name}\n{plan}");
            continue;
        }
        run_once(&context, &sql)
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        let mut times = Vec::with_capacity(args.runs);
        let mut rows = 0;
        for _ in 0..args.runs {
            let (ms, n) = run_once(&context, &sql)
                .await
                .map_err(|e| format!("{name}: {e}"))?;
            times.push(ms);
            rows = n;
        }
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "{name:>4}  median {:>9.1} ms  min {:>9.1}  max {:>9.1}  rows {rows}",
            sorted[sorted.len() / 2],
            sorted[0],
            sorted[sorted.len() - 1],
        );
        results.insert(
            name.clone(),
            serde_json::json!({ "times_ms": times, "rows": rows }),
        );
    }
    if let Some(path) = &args.json {
        let document = serde_json::json!({
            "engine": format!("datafusion-{}", args.settings),
            "queries": results,
        });
        std::fs::write(path, document.to_string())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn main() {
    meshgate::allocator::configure();
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("tpch: {message}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Err(message) = runtime.block_on(run(args)) {
        eprintln!("tpch: {message}");
        std::process::exit(1);
    }
}
