//! Statements that differ only in the constants they compare columns with
//! share one plan.
//!
//! Point lookups and short ranges arrive as text with their keys written
//! in (`WHERE o_orderkey = 42`), and each text is new to the plan cache.
//! Turning such a statement into a logical plan (resolving its products,
//! binding their policies, typing every expression) costs more than
//! running it. A statement's *shape* is the statement with each constant
//! that a WHERE clause compares a column with (`=`, `<>`, `<`, `<=`, `>`,
//! `>=`, `BETWEEN`, `IN` lists) made a placeholder, when the constant is an
//! integer that fits in 64 bits or a quoted string. A shape is planned once
//! for a caller, like a statement (see [`super::PlanCache`]), and each
//! statement of that shape binds its constants into that plan.
//!
//! The plan so bound is the plan of the statement itself. The planner
//! types an integer constant as Int64 and a quoted string as Utf8, and a
//! shape is used only when each of its placeholders was typed the same way
//! from the column it is compared with. A constant compared with an Int32
//! or a date column is typed otherwise: such a shape is remembered as
//! unusable and its statements are planned as written. Optimization, and
//! with it every pruning and pushdown the constants allow, happens at each
//! execution, after binding, as for any statement.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::DataType;
use datafusion::common::ScalarValue;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DataFusionStatement;
use datafusion::sql::sqlparser::ast::{
    BinaryOperator, Expr, Query, SetExpr, Statement, UnaryOperator, Value, VisitMut, VisitorMut,
    visit_expressions,
};

use super::{CachedPlan, PreparedQuery, plan_statement};
use crate::auth::CallerIdentity;
use crate::catalog::ReadLog;

/// Shapes planned recently, for whom they were planned: the same rules as
/// [`super::PlanCache`] (identity, token, published mesh, time to live).
/// A shape is kept with its plan, whose placeholders are typed as the
/// constants were, or with `None`: a shape that did not plan, or whose
/// placeholders were typed otherwise, and whose statements are planned as
/// written. That is remembered longer, so that a statement run now and
/// then (a report filtering on dates) is not planned twice each time.
pub(super) type ShapeCache = moka::sync::Cache<ShapeKey, Option<Arc<CachedPlan>>>;

/// How long a shape found unusable is remembered.
const UNUSABLE_TTL: Duration = Duration::from_secs(3600);

/// An empty [`ShapeCache`] of `entries` shapes, each usable one kept for
/// `ttl`.
pub(super) fn shape_cache(entries: u64, ttl: Duration) -> ShapeCache {
    moka::sync::Cache::builder()
        .max_capacity(entries)
        .expire_after(Lifetimes { usable: ttl })
        .build()
}

struct Lifetimes {
    usable: Duration,
}

impl moka::Expiry<ShapeKey, Option<Arc<CachedPlan>>> for Lifetimes {
    fn expire_after_create(
        &self,
        _key: &ShapeKey,
        plan: &Option<Arc<CachedPlan>>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(if plan.is_some() {
            self.usable
        } else {
            UNUSABLE_TTL
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct ShapeKey {
    caller: Arc<CallerIdentity>,
    token: Option<Arc<str>>,
    shape: Arc<Statement>,
    /// The types of the constants taken out, in placeholder order.
    types: Vec<DataType>,
}

/// A statement as a shape and the constants taken out of it.
#[derive(Debug)]
pub(super) struct Shape {
    statement: Statement,
    values: Vec<ScalarValue>,
}

/// The shape of `statement`: `None` when it is not a query, holds
/// placeholders of its own, or compares no column with a constant.
pub(super) fn shape_of(statement: &DataFusionStatement) -> Option<Shape> {
    let DataFusionStatement::Statement(inner) = statement else {
        return None;
    };
    if !matches!(inner.as_ref(), Statement::Query(_)) || has_placeholders(inner) {
        return None;
    }
    let mut shaping = Shaping::default();
    let mut shaped = inner.as_ref().clone();
    let _ = shaped.visit(&mut shaping);
    (!shaping.values.is_empty()).then_some(Shape {
        statement: shaped,
        values: shaping.values,
    })
}

fn has_placeholders(statement: &Statement) -> bool {
    visit_expressions(statement, |expr| match expr {
        Expr::Value(value) if matches!(value.value, Value::Placeholder(_)) => {
            ControlFlow::Break(())
        }
        _ => ControlFlow::Continue(()),
    })
    .is_break()
}

/// Takes the constants out of the WHERE clause of every query it visits
/// (subqueries are visited after the query holding them).
#[derive(Debug, Default)]
struct Shaping {
    values: Vec<ScalarValue>,
}

impl VisitorMut for Shaping {
    type Break = ();

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<()> {
        self.body(&mut query.body);
        ControlFlow::Continue(())
    }
}

impl Shaping {
    fn body(&mut self, body: &mut SetExpr) {
        match body {
            SetExpr::Select(select) => {
                if let Some(selection) = &mut select.selection {
                    self.condition(selection);
                }
            }
            SetExpr::SetOperation { left, right, .. } => {
                self.body(left);
                self.body(right);
            }
            _ => {}
        }
    }

    /// Walks the connectives of a condition to its comparisons.
    fn condition(&mut self, expr: &mut Expr) {
        match expr {
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And | BinaryOperator::Or,
                right,
            } => {
                self.condition(left);
                self.condition(right);
            }
            Expr::Nested(inner)
            | Expr::UnaryOp {
                op: UnaryOperator::Not,
                expr: inner,
            } => self.condition(inner),
            Expr::BinaryOp {
                left,
                op:
                    BinaryOperator::Eq
                    | BinaryOperator::NotEq
                    | BinaryOperator::Lt
                    | BinaryOperator::LtEq
                    | BinaryOperator::Gt
                    | BinaryOperator::GtEq,
                right,
            } => {
                if is_column(left) {
                    self.constant(right);
                } else if is_column(right) {
                    self.constant(left);
                }
            }
            Expr::Between {
                expr, low, high, ..
            } if is_column(expr) => {
                self.constant(low);
                self.constant(high);
            }
            Expr::InList { expr, list, .. } if is_column(expr) => {
                for item in list {
                    self.constant(item);
                }
            }
            _ => {}
        }
    }

    /// Makes `expr` the next placeholder when it is a constant the planner
    /// types as Int64 (digits only, within range) or Utf8 (a quoted string).
    fn constant(&mut self, expr: &mut Expr) {
        let Expr::Value(value) = expr else {
            return;
        };
        let scalar = match &value.value {
            Value::Number(digits, false) if digits.bytes().all(|b| b.is_ascii_digit()) => {
                match digits.parse::<i64>() {
                    Ok(number) => ScalarValue::Int64(Some(number)),
                    Err(_) => return,
                }
            }
            Value::SingleQuotedString(text) => ScalarValue::Utf8(Some(text.clone())),
            _ => return,
        };
        self.values.push(scalar);
        value.value = Value::Placeholder(format!("${}", self.values.len()));
    }
}

fn is_column(expr: &Expr) -> bool {
    matches!(expr, Expr::Identifier(_) | Expr::CompoundIdentifier(_))
}

/// Where one session finds and keeps the plans of shapes.
#[derive(Debug, Clone)]
pub(super) struct Shapes {
    pub(super) cache: ShapeCache,
    pub(super) caller: Arc<CallerIdentity>,
    pub(super) token: Option<Arc<str>>,
    pub(super) reads: Arc<parking_lot::Mutex<ReadLog>>,
}

impl Shapes {
    /// The plan of `statement` (whose text is `sql`) bound from the plan of
    /// its shape, and whether that plan was there already (rather than
    /// planned now): `None` when the statement has no usable shape, and is
    /// to be planned as written.
    ///
    /// `context` gives the session to plan a shape in, when one is planned.
    pub(super) async fn plan<'a>(
        &self,
        context: impl FnOnce() -> &'a SessionContext,
        statement: &DataFusionStatement,
        sql: &str,
    ) -> Option<(PreparedQuery, bool)> {
        let Shape { statement, values } = shape_of(statement)?;
        let types: Vec<DataType> = values.iter().map(ScalarValue::data_type).collect();
        let key = ShapeKey {
            caller: Arc::clone(&self.caller),
            token: self.token.clone(),
            shape: Arc::new(statement),
            types,
        };
        let (planned, reused) = match self.cache.get(&key) {
            Some(planned) => (planned, true),
            None => {
                let shape = DataFusionStatement::Statement(Box::new(key.shape.as_ref().clone()));
                let planned = match plan_statement(context(), shape, sql).await {
                    Ok(query) if query.parameter_types == key.types => Some(Arc::new(CachedPlan {
                        query,
                        reads: self.reads.lock().clone(),
                    })),
                    _ => None,
                };
                self.cache.insert(key, planned.clone());
                (planned, false)
            }
        };
        let cached = planned?;
        if reused {
            self.reads.lock().merge(&cached.reads);
        }
        let mut bound = cached.query.bind(values).ok()?;
        bound.sql = Arc::from(sql);
        Some((bound, reused))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Date32Array, Decimal128Array, Int32Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;
    use arrow::util::pretty::pretty_format_batches;
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    use super::*;
    use crate::query::{parse_statement, plan_statement};

    /// `t`: 100 rows of an Int64 key, an Int32, a string, a date and a
    /// decimal.
    fn context() -> SessionContext {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("small", DataType::Int32, false),
            Field::new("name", DataType::Utf8, false),
            Field::new("day", DataType::Date32, false),
            Field::new("price", DataType::Decimal128(15, 2), false),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from_iter_values(0..100)),
                Arc::new(Int32Array::from_iter_values(0..100)),
                Arc::new(StringArray::from_iter_values(
                    (0..100).map(|i| format!("n{}", i % 10)),
                )),
                Arc::new(Date32Array::from_iter_values(10_000..10_100)),
                Arc::new(
                    Decimal128Array::from_iter_values((0..100).map(|i| i * 150))
                        .with_precision_and_scale(15, 2)
                        .unwrap(),
                ),
            ],
        )
        .unwrap();
        let ctx = SessionContext::new();
        let table = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        ctx
    }

    fn shapes() -> Shapes {
        Shapes {
            cache: shape_cache(100, Duration::from_secs(10)),
            caller: Arc::new(CallerIdentity {
                user: "sam".into(),
                groups: vec![],
                attributes: Default::default(),
            }),
            token: None,
            reads: Default::default(),
        }
    }

    fn shape(sql: &str) -> Option<(String, Vec<ScalarValue>)> {
        let statement = parse_statement(context().copied_config().options(), sql).unwrap();
        shape_of(&statement).map(|shape| (shape.statement.to_string(), shape.values))
    }

    #[test]
    fn constants_compared_with_columns_in_where_clauses_become_placeholders() {
        let int = |n| ScalarValue::Int64(Some(n));
        let text = |s: &str| ScalarValue::Utf8(Some(s.into()));
        assert_eq!(
            shape("SELECT * FROM t WHERE id = 42"),
            Some(("SELECT * FROM t WHERE id = $1".into(), vec![int(42)]))
        );
        assert_eq!(
            shape(
                "SELECT name FROM t WHERE 7 < id AND (name = 'it''s' OR NOT id IN (1, 2)) \
                 AND id NOT BETWEEN 3 AND 4"
            ),
            Some((
                "SELECT name FROM t WHERE $1 < id AND (name = $2 OR NOT id IN ($3, $4)) \
                 AND id NOT BETWEEN $5 AND $6"
                    .into(),
                vec![int(7), text("it's"), int(1), int(2), int(3), int(4)]
            ))
        );
        // Subqueries and set operations, outer query first.
        assert_eq!(
            shape(
                "SELECT id FROM t WHERE id IN (SELECT id FROM t WHERE name = 'b') AND id < 9 \
                 UNION ALL SELECT id FROM t WHERE t.name <> 'a'"
            ),
            Some((
                "SELECT id FROM t WHERE id IN (SELECT id FROM t WHERE name = $3) AND id < $1 \
                 UNION ALL SELECT id FROM t WHERE t.name <> $2"
                    .into(),
                vec![int(9), text("a"), text("b")]
            ))
        );
        // Not a column compared with a 64-bit integer or a string, not in
        // a WHERE clause, or placeholders of its own.
        for sql in [
            "SELECT id = 5 FROM t",
            "SELECT * FROM t WHERE id = -5",
            "SELECT * FROM t WHERE id = 1.5",
            "SELECT * FROM t WHERE id = 9223372036854775808",
            "SELECT * FROM t WHERE id + 1 = 5",
            "SELECT * FROM t WHERE name LIKE 'n%'",
            "SELECT * FROM t WHERE id = $1",
            "SELECT * FROM t WHERE id = ? AND name = 'a'",
            "SELECT count(*) FROM t GROUP BY name HAVING count(*) > 2",
            "EXPLAIN SELECT * FROM t WHERE id = 5",
        ] {
            assert_eq!(shape(sql), None, "{sql}");
        }
    }

    /// Plans `sql` through `shapes`: the plan and whether it was reused,
    /// or `None` when planned as written.
    async fn through(
        shapes: &Shapes,
        ctx: &SessionContext,
        sql: &str,
    ) -> Option<(PreparedQuery, bool)> {
        let statement = parse_statement(ctx.copied_config().options(), sql).unwrap();
        shapes.plan(|| ctx, &statement, sql).await
    }

    async fn planned_as_written(ctx: &SessionContext, sql: &str) -> PreparedQuery {
        let statement = parse_statement(ctx.copied_config().options(), sql).unwrap();
        plan_statement(ctx, statement, sql).await.unwrap()
    }

    async fn answer(ctx: &SessionContext, query: &PreparedQuery) -> String {
        let batches = ctx
            .execute_logical_plan(query.plan.clone())
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        pretty_format_batches(&batches).unwrap().to_string()
    }

    #[tokio::test]
    async fn a_bound_shape_plans_and_answers_as_the_statement_does() {
        let ctx = context();
        let shapes = shapes();
        // Each statement twice: the shape is planned, then reused with
        // other constants.
        let pairs = [
            (
                "SELECT * FROM t WHERE id = 42",
                "SELECT * FROM t WHERE id = 7",
            ),
            (
                "SELECT name, id FROM t WHERE id BETWEEN 10 AND 19 ORDER BY id",
                "SELECT name, id FROM t WHERE id BETWEEN 50 AND 52 ORDER BY id",
            ),
            (
                "SELECT id FROM t WHERE 90 < id AND (name = 'n1' OR NOT id IN (93, 94)) ORDER BY id",
                "SELECT id FROM t WHERE 10 < id AND (name = 'n3' OR NOT id IN (11, 12)) ORDER BY id",
            ),
            (
                "SELECT id FROM t WHERE id IN (SELECT id FROM t WHERE name = 'n2') AND id < 30 \
                 UNION ALL SELECT id FROM t WHERE t.name = 'n5' ORDER BY id",
                "SELECT id FROM t WHERE id IN (SELECT id FROM t WHERE name = 'n4') AND id < 60 \
                 UNION ALL SELECT id FROM t WHERE t.name = 'n9' ORDER BY id",
            ),
            (
                "SELECT a.id, b.name FROM t a JOIN t b ON a.id = b.id WHERE a.id < 5 AND b.name <> 'n1' ORDER BY a.id",
                "SELECT a.id, b.name FROM t a JOIN t b ON a.id = b.id WHERE a.id < 8 AND b.name <> 'n2' ORDER BY a.id",
            ),
            (
                "SELECT count(*) FROM t o WHERE EXISTS (SELECT 1 FROM t i WHERE i.id = o.id AND i.name = 'n1')",
                "SELECT count(*) FROM t o WHERE EXISTS (SELECT 1 FROM t i WHERE i.id = o.id AND i.name = 'n7')",
            ),
        ];
        for (first, second) in pairs {
            for (sql, reused) in [(first, false), (second, true)] {
                let (shaped, was_reused) = through(&shapes, &ctx, sql)
                    .await
                    .unwrap_or_else(|| panic!("no usable shape: {sql}"));
                assert_eq!(was_reused, reused, "{sql}");
                assert_eq!(&*shaped.sql, sql);
                assert_eq!(shaped.parameter_count(), 0);
                let written = planned_as_written(&ctx, sql).await;
                assert_eq!(
                    shaped.plan.display_indent_schema().to_string(),
                    written.plan.display_indent_schema().to_string(),
                    "{sql}"
                );
                let optimized = |query: &PreparedQuery| {
                    ctx.state()
                        .optimize(&query.plan)
                        .unwrap()
                        .display_indent_schema()
                        .to_string()
                };
                assert_eq!(optimized(&shaped), optimized(&written), "{sql}");
                assert_eq!(answer(&ctx, &shaped).await, answer(&ctx, &written).await);
            }
        }
        // The constants are those of each statement.
        let (seven, _) = through(&shapes, &ctx, "SELECT id FROM t WHERE id = 7")
            .await
            .unwrap();
        assert!(answer(&ctx, &seven).await.contains("| 7  |"));
    }

    #[tokio::test]
    async fn a_constant_typed_otherwise_than_its_column_is_planned_as_written() {
        let ctx = context();
        let shapes = shapes();
        for sql in [
            "SELECT * FROM t WHERE small = 5",
            "SELECT * FROM t WHERE day = '1997-05-20'",
            "SELECT * FROM t WHERE price > 5",
            "SELECT * FROM t WHERE id = 'x'",
            "SELECT * FROM t WHERE nothing = 5",
        ] {
            assert!(through(&shapes, &ctx, sql).await.is_none(), "{sql}");
            // Remembered: not planned again.
            let statement = parse_statement(ctx.copied_config().options(), sql).unwrap();
            let shape = shape_of(&statement).unwrap();
            let key = ShapeKey {
                caller: Arc::clone(&shapes.caller),
                token: None,
                shape: Arc::new(shape.statement),
                types: shape.values.iter().map(ScalarValue::data_type).collect(),
            };
            assert!(matches!(shapes.cache.get(&key), Some(None)));
            assert!(through(&shapes, &ctx, sql).await.is_none(), "{sql}");
        }
        // A usable shape with a constant of another type is another shape.
        assert!(
            through(&shapes, &ctx, "SELECT * FROM t WHERE name = 'n1'")
                .await
                .is_some()
        );
        assert!(
            through(&shapes, &ctx, "SELECT * FROM t WHERE name = 5")
                .await
                .is_none()
        );
    }
}
