//! Join keys sent to a SQL source with its statement.
//!
//! A hash join hands the scan on its probe side a dynamic filter: once its
//! build side is in, the keys that side holds (a list of them when they are
//! few) and the range they span. A Parquet scan prunes with it as it reads;
//! a SQL source is sent one statement when its scan starts, so the filter
//! is of use there only if the statement carries it. [`RemoteExec`] takes
//! the filters of the joins above it, waits for them to be final when its
//! scan starts (the join polls its probe side only then anyway), and sends
//! its statement with the keys they hold: `WITH "keyed"("k0", ..) AS
//! (statement) SELECT * FROM "keyed" WHERE "k2" IN (7, 12)`. A source that
//! answers a TPC-H query by joining `partsupp` with the 752 parts a filter
//! kept in another domain then looks those 752 parts up by key rather than
//! sending all 800 000 rows for the gateway to drop.
//!
//! What is sent only ever keeps more rows than the join does, never fewer:
//! the join still matches every row it is sent. Only integer keys of integer
//! columns are sent, which compare alike in PostgreSQL, SQLite and here.
//! The condition applies to the statement's output, outside any subquery
//! that holds the caller's policies, so it changes nothing of what the
//! policies see.
//!
//! [`RemoteExec`]: super::RemoteExec

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;

use arrow::datatypes::{DataType, Schema};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{BinaryExpr, CaseExpr, Column, InListExpr, Literal};
use datafusion::physical_expr::utils::split_conjunction;

use super::Dialect;

/// The most keys of one column sent in a list; past this, their range.
const MAX_LISTED: usize = 4096;

/// Which integer columns of a statement's output hold what the source
/// stores, so that a key compares in the source as here.
#[derive(Debug, Clone, Default)]
pub(crate) enum KeyColumns {
    /// Every one (PostgreSQL: a product's integer column is an integer
    /// column of the table).
    #[default]
    All,
    /// Those named (SQLite: columns of `INTEGER` affinity, which store any
    /// integer written to them as one). Any other may hold text that reads
    /// here as an integer (`' 7'`, `'07'`), and is compared as
    /// `CAST(column AS INTEGER)`, which reads such text alike.
    Named(Arc<HashSet<String>>),
}

impl KeyColumns {
    /// For a statement whose output columns' storage is not known: in
    /// SQLite, every key column is compared through a cast.
    pub(crate) fn unknown(dialect: Dialect) -> Self {
        match dialect {
            Dialect::Sqlite => Self::Named(Arc::default()),
            Dialect::Postgres | Dialect::FlightSql => Self::All,
        }
    }

    /// For the columns of a table whose types the source reports as
    /// `found` (SQLite's integers are its columns of `INTEGER` affinity).
    pub(crate) fn of_table(dialect: Dialect, found: &Schema) -> Self {
        match dialect {
            Dialect::Sqlite => Self::Named(Arc::new(
                found
                    .fields()
                    .iter()
                    .filter(|field| *field.data_type() == DataType::Int64)
                    .map(|field| field.name().clone())
                    .collect(),
            )),
            Dialect::Postgres | Dialect::FlightSql => Self::All,
        }
    }

    fn stored(&self, name: &str) -> bool {
        match self {
            Self::All => true,
            Self::Named(names) => names.contains(name),
        }
    }
}

/// What a join filter lets through, as a source can be told it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyCondition {
    /// No row: the join's build side is empty.
    Nothing,
    /// Rows whose columns hold these keys (each column's condition holds).
    Keys(Vec<(usize, Keys)>),
}

/// The keys a column may hold for a row to pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Keys {
    List(BTreeSet<i64>),
    Range(i64, i64),
}

impl KeyCondition {
    /// What passes both `self` and `other`.
    pub(crate) fn and(self, other: KeyCondition) -> KeyCondition {
        match (self, other) {
            (Self::Keys(mut columns), Self::Keys(more)) => {
                columns.extend(more);
                Self::Keys(columns)
            }
            _ => Self::Nothing,
        }
    }

    /// The condition a join filter's current expression sets on the columns
    /// of `schema`, if it is one a source can be sent: a key list or range
    /// per integer column, or one per partition of a partitioned join
    /// (`CASE hash(key) % n WHEN i THEN ... ELSE false END`), which pass
    /// together the union of theirs.
    pub(crate) fn of(filter: &Arc<dyn PhysicalExpr>, schema: &Schema) -> Option<Self> {
        if is_literal(filter, false) {
            return Some(Self::Nothing);
        }
        let branches: Vec<&Arc<dyn PhysicalExpr>> = match filter.downcast_ref::<CaseExpr>() {
            Some(case) => {
                if case.expr().is_none() || !is_literal(case.else_expr()?, false) {
                    return None;
                }
                case.when_then_expr()
                    .iter()
                    .map(|(_, then)| then)
                    .filter(|then| !is_literal(then, false))
                    .collect()
            }
            None => vec![filter],
        };
        if branches.is_empty() {
            return Some(Self::Nothing);
        }
        let conditions: Vec<Vec<(usize, Keys)>> = branches
            .into_iter()
            .map(|branch| branch_keys(branch, schema))
            .collect();
        // A column is restricted only where every branch restricts it.
        let (first, rest) = conditions.split_first()?;
        let mut columns = Vec::new();
        for (index, keys) in first {
            let mut union = keys.clone();
            for other in rest {
                let (_, keys) = other.iter().find(|(i, _)| i == index)?;
                union = union.union(keys);
            }
            columns.push((*index, union));
        }
        (!columns.is_empty()).then_some(Self::Keys(columns))
    }

    /// `sql` sent with this condition on its output, whose columns are
    /// those of `schema`. `fenced`, the source runs `sql` as written and
    /// applies the condition to what it answers, rather than plan the two
    /// as one.
    pub(crate) fn wrap(
        &self,
        sql: &str,
        schema: &Schema,
        stored: &KeyColumns,
        fenced: bool,
    ) -> String {
        let name = |index: usize| format!("\"meshgate_{index}\"");
        let mut text = String::from("WITH \"meshgate_keyed\"(");
        for index in 0..schema.fields().len() {
            if index > 0 {
                text.push_str(", ");
            }
            text.push_str(&name(index));
        }
        if fenced {
            // SQLite neither merges a subquery with a limit into the query
            // around it nor moves that query's conditions into it.
            let _ = write!(text, ") AS (SELECT * FROM ({sql}) LIMIT -1 OFFSET 0)");
        } else {
            let _ = write!(text, ") AS ({sql})");
        }
        text.push_str(" SELECT * FROM \"meshgate_keyed\" WHERE ");
        match self {
            Self::Nothing => text.push_str("1 = 0"),
            Self::Keys(columns) => {
                for (position, (index, keys)) in columns.iter().enumerate() {
                    if position > 0 {
                        text.push_str(" AND ");
                    }
                    let column = match schema.fields().get(*index) {
                        Some(field) if stored.stored(field.name()) => name(*index),
                        _ => format!("CAST({} AS INTEGER)", name(*index)),
                    };
                    match keys {
                        Keys::List(list) => {
                            let _ = write!(text, "{column} IN (");
                            for (i, key) in list.iter().enumerate() {
                                if i > 0 {
                                    text.push_str(", ");
                                }
                                let _ = write!(text, "{key}");
                            }
                            text.push(')');
                        }
                        Keys::Range(min, max) => {
                            let _ = write!(text, "{column} BETWEEN {min} AND {max}");
                        }
                    }
                }
            }
        }
        text
    }
}

impl KeyCondition {
    /// A summary for EXPLAIN ANALYZE: which columns of `schema`, how many
    /// keys or what range.
    pub(crate) fn summary(&self, schema: &Schema) -> String {
        let Self::Keys(columns) = self else {
            return "no rows".to_string();
        };
        let mut text = String::new();
        for (position, (index, keys)) in columns.iter().enumerate() {
            if position > 0 {
                text.push_str(", ");
            }
            let name = schema
                .fields()
                .get(*index)
                .map_or("?", |f| f.name().as_str());
            let _ = match keys {
                Keys::List(list) => write!(text, "{name}: {} keys", list.len()),
                Keys::Range(min, max) => write!(text, "{name}: {min} to {max}"),
            };
        }
        text
    }
}

impl Keys {
    fn union(&self, other: &Keys) -> Keys {
        match (self, other) {
            (Keys::List(a), Keys::List(b)) if a.len() + b.len() <= MAX_LISTED => {
                Keys::List(a.union(b).copied().collect())
            }
            _ => {
                let (a_min, a_max) = self.range();
                let (b_min, b_max) = other.range();
                Keys::Range(a_min.min(b_min), a_max.max(b_max))
            }
        }
    }

    fn range(&self) -> (i64, i64) {
        match self {
            // A list is never empty (see `branch_keys`).
            Keys::List(list) => (
                list.first().copied().unwrap_or(0),
                list.last().copied().unwrap_or(0),
            ),
            Keys::Range(min, max) => (*min, *max),
        }
    }

    /// The narrower of two conditions on one column, both of which hold.
    fn narrower(self, other: Keys) -> Keys {
        match (self, other) {
            (Keys::List(list), _) | (_, Keys::List(list)) => Keys::List(list),
            (Keys::Range(a_min, a_max), Keys::Range(b_min, b_max)) => {
                Keys::Range(a_min.max(b_min), a_max.min(b_max))
            }
        }
    }
}

/// The key lists and ranges of one branch's conjuncts, on integer columns
/// of `schema`: `col IN (...)` and `col >= min AND col <= max`.
fn branch_keys(branch: &Arc<dyn PhysicalExpr>, schema: &Schema) -> Vec<(usize, Keys)> {
    let mut lists: Vec<(usize, Keys)> = Vec::new();
    let mut lower: Vec<(usize, i64)> = Vec::new();
    let mut upper: Vec<(usize, i64)> = Vec::new();
    for conjunct in split_conjunction(branch) {
        if let Some(list) = conjunct.downcast_ref::<InListExpr>() {
            if list.negated() {
                continue;
            }
            let Some(index) = integer_column(list.expr(), schema) else {
                continue;
            };
            let keys: Option<BTreeSet<i64>> = list
                .list()
                .iter()
                .map(|item| integer(item.downcast_ref::<Literal>()?.value()))
                .collect();
            if let Some(keys) = keys.filter(|k| !k.is_empty() && k.len() <= MAX_LISTED) {
                lists.push((index, Keys::List(keys)));
            }
        } else if let Some(comparison) = conjunct.downcast_ref::<BinaryExpr>() {
            let Some(index) = integer_column(comparison.left(), schema) else {
                continue;
            };
            let Some(value) = comparison
                .right()
                .downcast_ref::<Literal>()
                .and_then(|literal| integer(literal.value()))
            else {
                continue;
            };
            match comparison.op() {
                Operator::GtEq => lower.push((index, value)),
                Operator::LtEq => upper.push((index, value)),
                _ => {}
            }
        }
    }
    let mut keys: Vec<(usize, Keys)> = Vec::new();
    let ranges = lower.iter().filter_map(|&(index, min)| {
        let (_, max) = upper.iter().find(|(i, _)| *i == index)?;
        Some((index, Keys::Range(min, *max)))
    });
    for (index, condition) in lists.into_iter().chain(ranges) {
        match keys.iter_mut().find(|(i, _)| *i == index) {
            Some((_, existing)) => {
                let current = std::mem::replace(existing, Keys::Range(0, 0));
                *existing = current.narrower(condition);
            }
            None => keys.push((index, condition)),
        }
    }
    keys
}

/// The index of `expr` in `schema` if it is a column of an integer type
/// whose values fit a BIGINT.
fn integer_column(expr: &Arc<dyn PhysicalExpr>, schema: &Schema) -> Option<usize> {
    let column = expr.downcast_ref::<Column>()?;
    let field = schema.fields().get(column.index())?;
    let data_type = field.data_type();
    (field.name() == column.name() && data_type.is_integer() && *data_type != DataType::UInt64)
        .then_some(column.index())
}

fn integer(value: &ScalarValue) -> Option<i64> {
    match value {
        ScalarValue::Int8(Some(v)) => Some(i64::from(*v)),
        ScalarValue::Int16(Some(v)) => Some(i64::from(*v)),
        ScalarValue::Int32(Some(v)) => Some(i64::from(*v)),
        ScalarValue::Int64(Some(v)) => Some(*v),
        ScalarValue::UInt8(Some(v)) => Some(i64::from(*v)),
        ScalarValue::UInt16(Some(v)) => Some(i64::from(*v)),
        ScalarValue::UInt32(Some(v)) => Some(i64::from(*v)),
        ScalarValue::UInt64(Some(v)) => i64::try_from(*v).ok(),
        _ => None,
    }
}

fn is_literal(expr: &Arc<dyn PhysicalExpr>, value: bool) -> bool {
    expr.downcast_ref::<Literal>()
        .is_some_and(|literal| literal.value() == &ScalarValue::Boolean(Some(value)))
}

#[cfg(test)]
mod tests {
    use arrow::datatypes::Field;
    use datafusion::physical_expr::expressions::{col, in_list, lit};

    use super::*;

    fn schema() -> Schema {
        Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
            Field::new("nation", DataType::Int32, true),
        ])
    }

    fn list(column: &str, keys: &[i64]) -> Arc<dyn PhysicalExpr> {
        let schema = schema();
        let keys = keys.iter().map(|&k| lit(k)).collect();
        in_list(col(column, &schema).unwrap(), keys, &false, &schema).unwrap()
    }

    fn bounds(column: &str, min: i64, max: i64) -> Arc<dyn PhysicalExpr> {
        let schema = schema();
        let column = col(column, &schema).unwrap();
        let at_least = Arc::new(BinaryExpr::new(
            Arc::clone(&column),
            Operator::GtEq,
            lit(min),
        ));
        let at_most = Arc::new(BinaryExpr::new(column, Operator::LtEq, lit(max)));
        Arc::new(BinaryExpr::new(at_least, Operator::And, at_most))
    }

    fn and(a: Arc<dyn PhysicalExpr>, b: Arc<dyn PhysicalExpr>) -> Arc<dyn PhysicalExpr> {
        Arc::new(BinaryExpr::new(a, Operator::And, b))
    }

    /// `CASE hash % n WHEN 0 THEN .. WHEN 1 THEN .. ELSE false END`, as a
    /// partitioned join writes its filter.
    fn partitioned(branches: Vec<Arc<dyn PhysicalExpr>>) -> Arc<dyn PhysicalExpr> {
        let when_then = branches
            .into_iter()
            .enumerate()
            .map(|(i, then)| (lit(i as u64), then))
            .collect();
        Arc::new(CaseExpr::try_new(Some(lit(0_u64)), when_then, Some(lit(false))).unwrap())
    }

    fn keys(columns: Vec<(usize, Keys)>) -> Option<KeyCondition> {
        Some(KeyCondition::Keys(columns))
    }

    fn listed(keys: &[i64]) -> Keys {
        Keys::List(keys.iter().copied().collect())
    }

    #[test]
    fn key_lists_and_ranges_are_read_from_join_filters() {
        let schema = schema();
        let of = |filter| KeyCondition::of(&filter, &schema);
        // A join built on one partition: bounds and a list.
        assert_eq!(
            of(and(bounds("id", 3, 9), list("id", &[9, 3, 5]))),
            keys(vec![(0, listed(&[3, 5, 9]))])
        );
        // Too many keys for a list, or a hash table: the range.
        assert_eq!(
            of(bounds("nation", -2, 40)),
            keys(vec![(2, Keys::Range(-2, 40))])
        );
        // A partitioned join: any partition's keys pass.
        assert_eq!(
            of(partitioned(vec![
                and(bounds("id", 1, 2), list("id", &[1, 2])),
                Arc::new(Literal::new(ScalarValue::Boolean(Some(false)))),
                and(bounds("id", 7, 7), list("id", &[7])),
            ])),
            keys(vec![(0, listed(&[1, 2, 7]))])
        );
        // One partition with a list and one without: the union of ranges.
        assert_eq!(
            of(partitioned(vec![
                and(bounds("id", 1, 2), list("id", &[1, 2])),
                bounds("id", 50, 90),
            ])),
            keys(vec![(0, Keys::Range(1, 90))])
        );
        // A join on two columns: each column's keys.
        assert_eq!(
            of(and(bounds("id", 1, 4), bounds("nation", 5, 5))),
            keys(vec![(0, Keys::Range(1, 4)), (2, Keys::Range(5, 5))])
        );
        // An empty build side: no row.
        assert_eq!(of(lit(false)), Some(KeyCondition::Nothing));
    }

    #[test]
    fn filters_a_source_cannot_be_sent_are_left_out() {
        let schema = schema();
        let of = |filter| KeyCondition::of(&filter, &schema);
        let name = col("name", &schema).unwrap();
        // Strings.
        let strings = in_list(Arc::clone(&name), vec![lit("a")], &false, &schema).unwrap();
        assert_eq!(of(strings), None);
        // A negated list.
        let keys = vec![lit(1_i64)];
        let negated = in_list(col("id", &schema).unwrap(), keys, &true, &schema).unwrap();
        assert_eq!(of(negated), None);
        // A join that needs the rows with a null key as well.
        let nulls = Arc::new(BinaryExpr::new(
            Arc::new(datafusion::physical_expr::expressions::IsNullExpr::new(
                col("id", &schema).unwrap(),
            )),
            Operator::Or,
            list("id", &[1]),
        ));
        assert_eq!(of(nulls), None);
        // A partition whose build side is unknown lets every row through.
        assert_eq!(of(partitioned(vec![list("id", &[1]), lit(true)])), None);
        // A bound alone.
        let above = Arc::new(BinaryExpr::new(
            col("id", &schema).unwrap(),
            Operator::GtEq,
            lit(3_i64),
        ));
        assert_eq!(of(above), None);
    }

    /// A row of the table below: id, name, nation.
    type Row = (i64, String, Option<i64>);

    /// Whether a row holds a condition's keys, written out here.
    type Holds = fn(&Row) -> bool;

    /// The statement a source is sent answers the rows of the statement it
    /// wraps that hold the keys: run in SQLite, against the same filter
    /// applied to all the rows here.
    #[test]
    fn a_statement_sent_with_keys_answers_the_rows_holding_them() {
        let db = rusqlite::Connection::open_in_memory().unwrap();
        db.execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, nation INTEGER);
             INSERT INTO t VALUES (1, 'a', 3), (2, 'b', 7), (3, 'c', -1), (4, 'd', NULL),
                                  (5, 'e', 7), (9, 'f', 2);",
        )
        .unwrap();
        let statement = "SELECT id, name, nation FROM t ORDER BY id";
        let rows = |sql: &str| -> Vec<Row> {
            let mut statement = db.prepare(sql).unwrap();
            let mut rows: Vec<_> = statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            rows.sort();
            rows
        };
        let all = rows(statement);
        let schema = schema();
        let cases: Vec<(KeyCondition, Holds)> = vec![
            (KeyCondition::Keys(vec![(0, listed(&[2, 9, 40]))]), |r| {
                [2, 9, 40].contains(&r.0)
            }),
            (KeyCondition::Keys(vec![(2, Keys::Range(-1, 3))]), |r| {
                r.2.is_some_and(|n| (-1..=3).contains(&n))
            }),
            (
                KeyCondition::Keys(vec![(0, Keys::Range(2, 9)), (2, listed(&[7]))]),
                |r| (2..=9).contains(&r.0) && r.2 == Some(7),
            ),
            (KeyCondition::Nothing, |_| false),
        ];
        for (condition, holds) in cases {
            let expected: Vec<_> = all.iter().filter(|r| holds(r)).cloned().collect();
            for fenced in [false, true] {
                let sent = condition.wrap(statement, &schema, &KeyColumns::All, fenced);
                assert_eq!(rows(&sent), expected, "{sent}");
            }
        }
        assert_eq!(
            KeyCondition::Keys(vec![(0, listed(&[2, 9])), (2, Keys::Range(-1, 3))]).wrap(
                "SELECT 1",
                &schema,
                &KeyColumns::All,
                false
            ),
            "WITH \"meshgate_keyed\"(\"meshgate_0\", \"meshgate_1\", \"meshgate_2\") AS (SELECT 1) \
             SELECT * FROM \"meshgate_keyed\" WHERE \"meshgate_0\" IN (2, 9) \
             AND \"meshgate_2\" BETWEEN -1 AND 3"
        );
    }

    /// Text an integer column of SQLite holds where it has no `INTEGER`
    /// affinity reads here as the integer it spells: such a column is sent
    /// its keys through a cast, which reads it alike.
    #[test]
    fn keys_of_a_column_without_integer_affinity_are_compared_as_read() {
        let db = rusqlite::Connection::open_in_memory().unwrap();
        db.execute_batch(
            "CREATE TABLE t (id INTEGER, loose TEXT, n);
             INSERT INTO t VALUES (1, ' 7', '07'), (2, '7', 7), (3, '+7 ', ' 8'), (4, '70', 'x');",
        )
        .unwrap();
        let schema = Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("loose", DataType::Int64, true),
            Field::new("n", DataType::Int64, true),
        ]);
        let ids = |sql: &str| -> Vec<i64> {
            let mut statement = db.prepare(sql).unwrap();
            statement
                .query_map([], |row| row.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        let stored = KeyColumns::Named(Arc::new(HashSet::from(["id".to_string()])));
        let statement = "SELECT id, loose, n FROM t ORDER BY id";
        let loose =
            KeyCondition::Keys(vec![(1, listed(&[7]))]).wrap(statement, &schema, &stored, false);
        assert!(
            loose.contains("CAST(\"meshgate_1\" AS INTEGER) IN (7)"),
            "{loose}"
        );
        assert_eq!(ids(&loose), vec![1, 2, 3]);
        let n = KeyCondition::Keys(vec![(2, Keys::Range(7, 8))])
            .wrap(statement, &schema, &stored, false);
        assert_eq!(ids(&n), vec![1, 2, 3]);
        let id =
            KeyCondition::Keys(vec![(0, listed(&[2, 4]))]).wrap(statement, &schema, &stored, false);
        assert!(id.contains("WHERE \"meshgate_0\" IN (2, 4)"), "{id}");
        assert_eq!(ids(&id), vec![2, 4]);
    }
}
