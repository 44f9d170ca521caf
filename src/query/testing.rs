//! Files and runs for the planner's tests.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::{ExecutionPlan, collect};
use datafusion::prelude::{SessionConfig, SessionContext};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

/// A session with the gateway's engine settings in 2 partitions, planned
/// with `rules`.
pub(crate) fn session_with_rules(
    rules: Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>>,
) -> SessionContext {
    let state = SessionStateBuilder::new()
        .with_config(super::session::engine_config().with_target_partitions(2))
        .with_default_features()
        .with_physical_optimizer_rules(rules)
        .build();
    SessionContext::new_with_state(state)
}

/// A session as the gateway makes one (its settings, rules and functions),
/// with an empty schema in its catalog for tables to be registered in.
pub(crate) fn gateway_session() -> SessionContext {
    let runtime = Arc::new(datafusion::execution::runtime_env::RuntimeEnv::default());
    let ctx = SessionContext::new_with_state(super::base_session_state(runtime));
    let catalog = Arc::new(datafusion::catalog::MemoryCatalogProvider::new());
    datafusion::catalog::CatalogProvider::register_schema(
        catalog.as_ref(),
        "public",
        Arc::new(datafusion::catalog::MemorySchemaProvider::new()),
    )
    .expect("schema");
    ctx.register_catalog(crate::catalog::CATALOG_NAME, catalog);
    ctx
}

/// A session planned with `rules` (see [`session_with_rules`]) holding
/// `table` as table `t`.
pub(crate) fn session_over(
    rules: Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>>,
    table: &RecordBatch,
) -> SessionContext {
    let ctx = session_with_rules(rules);
    let t = datafusion::datasource::MemTable::try_new(table.schema(), vec![vec![table.clone()]])
        .expect("table");
    ctx.register_table("t", Arc::new(t)).expect("register");
    ctx
}

/// What `sql` answers in `ctx`, as a pretty-printed table, or the error it
/// failed with.
pub(crate) async fn answer(ctx: &SessionContext, sql: &str) -> datafusion::error::Result<String> {
    let batches = ctx.sql(sql).await?.collect().await?;
    Ok(arrow::util::pretty::pretty_format_batches(&batches)?.to_string())
}

/// Asserts that `sql` answers in `wrapping`, whose kernels wrap around on
/// overflow (an answer, and a wrong one), and fails in `checked` with an
/// error that says `error`.
pub(crate) async fn assert_fails_where_it_wrapped(
    wrapping: &SessionContext,
    checked: &SessionContext,
    sql: &str,
    error: &str,
) {
    let wrapped = answer(wrapping, sql).await;
    assert!(wrapped.is_ok(), "{sql}: {wrapped:?}");
    let failure = answer(checked, sql).await.expect_err(sql).to_string();
    assert!(failure.contains(error), "{sql}: {failure}");
}

/// Asserts that `sql` answers in `checked` what it answers in `wrapping`.
pub(crate) async fn assert_answers_alike(
    wrapping: &SessionContext,
    checked: &SessionContext,
    sql: &str,
) {
    let expected = answer(wrapping, sql).await.expect(sql);
    assert_eq!(answer(checked, sql).await.expect(sql), expected, "{sql}");
}

/// Writes `columns` (name, values), each a non-null `Int64`, as one Parquet
/// file at `path`, in row groups of at most `row_group_rows` rows (the
/// writer's default when `None`).
pub(crate) fn write_int64_columns(
    path: &std::path::Path,
    columns: &[(&str, Vec<i64>)],
    row_group_rows: Option<usize>,
) {
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|(name, _)| Field::new(*name, DataType::Int64, false))
            .collect::<Vec<_>>(),
    ));
    let arrays: Vec<ArrayRef> = columns
        .iter()
        .map(|(_, values)| Arc::new(Int64Array::from(values.clone())) as ArrayRef)
        .collect();
    let batch = RecordBatch::try_new(Arc::clone(&schema), arrays).expect("batch");
    let mut properties = WriterProperties::builder();
    if let Some(rows) = row_group_rows {
        properties = properties.set_max_row_group_row_count(Some(rows));
    }
    let out = std::fs::File::create(path).expect("file");
    let mut writer = ArrowWriter::try_new(out, schema, Some(properties.build())).expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
}

/// The physical plan of `sql`.
pub(crate) async fn physical_plan(ctx: &SessionContext, sql: &str) -> Arc<dyn ExecutionPlan> {
    ctx.sql(sql)
        .await
        .expect("sql")
        .create_physical_plan()
        .await
        .expect("plan")
}

/// Runs `plan`: the batches it answered.
pub(crate) async fn run_plan(
    ctx: &SessionContext,
    plan: &Arc<dyn ExecutionPlan>,
) -> Vec<RecordBatch> {
    collect(Arc::clone(plan), ctx.task_ctx())
        .await
        .expect("run")
}

/// Plans and runs `sql`: the plan as it ran (with its metrics), and the
/// batches it answered.
pub(crate) async fn plan_and_run(
    ctx: &SessionContext,
    sql: &str,
) -> (Arc<dyn ExecutionPlan>, Vec<RecordBatch>) {
    let plan = physical_plan(ctx, sql).await;
    let batches = run_plan(ctx, &plan).await;
    (plan, batches)
}

/// A context that lists a product's directory at each scan, as the mesh's
/// does.
pub(crate) fn relisting_context() -> SessionContext {
    let runtime = RuntimeEnvBuilder::new()
        .with_cache_manager(CacheManagerConfig::default().with_list_files_cache_limit(0))
        .build_arc()
        .expect("runtime");
    SessionContext::new_with_config_rt(SessionConfig::new(), runtime)
}
