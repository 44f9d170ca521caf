//! Conjunctions (`a AND b AND c ...`) evaluated on the rows each condition
//! leaves undecided.
//!
//! DataFusion evaluates `a AND b AND c` as `(a AND b) AND c`, each `AND`
//! on its own: when few rows pass its left side, it copies the rows that
//! do out of the whole batch, evaluates its right side on them, and puts
//! the answers back in place one row at a time through a slice of the
//! answer per run of selected rows. A filter of five conditions over a
//! file in no particular order (TPC-H q6) copies the batch four times and
//! spends a sixth of the query putting answers back. A [`Conjunction`]
//! evaluates its conditions in order, each on the rows the earlier ones
//! left true or null, copying those rows out of the previous copy once
//! they are few (as DataFusion does, at a fifth of the batch), and sets
//! the answers in place once at the end, bit by bit from the positions of
//! the rows kept.
//!
//! The answer is DataFusion's: `AND` is Kleene's, a row is false once a
//! condition is false for it, and a condition is never evaluated on a row
//! DataFusion would not evaluate it on (rows an earlier condition made
//! false are left out exactly when DataFusion leaves them out, or sooner).
//!
//! The conditions run cheapest first: those that compare a fixed-width
//! column (a number, a date, a timestamp) with a constant, then those that
//! compare two such columns or look one up in a list of constants, then the
//! rest, each group in the order written. TPC-H q12's
//! `l_shipmode = 'MAIL' OR l_shipmode = 'SHIP'`, written first, then
//! compares the strings of the rows its date range leaves (one in seven)
//! rather than of all. A condition moved ahead cannot fail (it is made of
//! columns and constants only, of one type), so evaluating it on more rows
//! turns no answer into an error, and those behind it are evaluated on
//! fewer rows than before; `AND` answers alike in any order.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{Array, AsArray, BooleanArray, BooleanBufferBuilder};
use arrow::buffer::NullBuffer;
use arrow::compute::kernels::boolean::and_kleene;
use arrow::compute::{filter, filter_record_batch};
use arrow::datatypes::{DataType, Schema};
use arrow::record_batch::RecordBatch;
use datafusion::common::internal_err;
use datafusion::error::Result;
use datafusion::logical_expr::{ColumnarValue, Operator};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{
    BinaryExpr, Column, InListExpr, IsNotNullExpr, IsNullExpr, Literal, NotExpr,
};
use datafusion::physical_expr::utils::{conjunction, split_conjunction};

use crate::policy::is_comparison;

/// The share of a batch's rows below which the undecided rows are copied
/// out before the next condition: DataFusion's threshold for evaluating an
/// `AND`'s right side on the rows its left side passes.
const SELECT_BELOW: f64 = 0.2;

/// `expr`'s conditions as a [`Conjunction`], if it is an `AND` of at least
/// two conditions over rows of `schema`.
pub(super) fn conjunction_of(expr: &Arc<dyn PhysicalExpr>, schema: &Schema) -> Option<Conjunction> {
    let binary = expr.downcast_ref::<BinaryExpr>()?;
    if *binary.op() != Operator::And {
        return None;
    }
    let conditions: Vec<_> = split_conjunction(expr).into_iter().cloned().collect();
    if conditions.len() < 2 {
        return None;
    }
    let mut order: Vec<usize> = (0..conditions.len()).collect();
    // A stable sort: each cost's conditions stay in the order written.
    order.sort_by_key(|&i| cost(&conditions[i], schema));
    Some(Conjunction { conditions, order })
}

/// What a condition costs a row, cheapest first (see the module's
/// documentation). Only conditions that cannot fail cost less than
/// [`Cost::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Cost {
    /// A fixed-width column compared with a constant of its type, or
    /// tested for null.
    WithConstant,
    /// Two fixed-width columns of one type compared, or a fixed-width
    /// column looked up in a list of constants of its type.
    OfColumns,
    /// Anything else: strings, functions, arithmetic, casts.
    Other,
}

fn cost(condition: &Arc<dyn PhysicalExpr>, schema: &Schema) -> Cost {
    // A fixed-width column's type, or a constant's.
    let column = |expr: &Arc<dyn PhysicalExpr>| {
        expr.downcast_ref::<Column>()
            .and_then(|column| schema.fields().get(column.index()))
            .map(|field| field.data_type().clone())
            .filter(|t| t.is_primitive() || *t == DataType::Boolean)
    };
    let constant = |expr: &Arc<dyn PhysicalExpr>| {
        expr.downcast_ref::<Literal>()
            .map(|literal| literal.value().data_type())
    };
    if let Some(binary) = condition.downcast_ref::<BinaryExpr>() {
        let (left, right) = (binary.left(), binary.right());
        return match binary.op() {
            Operator::And | Operator::Or => cost(left, schema).max(cost(right, schema)),
            &op if is_comparison(op) => match (column(left), column(right)) {
                (Some(a), Some(b)) if a == b => Cost::OfColumns,
                (Some(a), None) if constant(right).as_ref() == Some(&a) => Cost::WithConstant,
                (None, Some(b)) if constant(left).as_ref() == Some(&b) => Cost::WithConstant,
                _ => Cost::Other,
            },
            _ => Cost::Other,
        };
    }
    if let Some(not) = condition.downcast_ref::<NotExpr>() {
        return cost(not.arg(), schema);
    }
    if let Some(test) = condition.downcast_ref::<IsNullExpr>() {
        return column(test.arg()).map_or(Cost::Other, |_| Cost::WithConstant);
    }
    if let Some(test) = condition.downcast_ref::<IsNotNullExpr>() {
        return column(test.arg()).map_or(Cost::Other, |_| Cost::WithConstant);
    }
    if let Some(list) = condition.downcast_ref::<InListExpr>()
        && let Some(t) = column(list.expr())
        && list
            .list()
            .iter()
            .all(|item| constant(item).as_ref() == Some(&t))
    {
        return Cost::OfColumns;
    }
    Cost::Other
}

/// An `AND` of conditions, evaluated on the rows still undecided in the
/// order of `order`. Displays as the `AND` it replaces.
#[derive(Debug, Clone)]
pub(crate) struct Conjunction {
    /// The conditions as written.
    conditions: Vec<Arc<dyn PhysicalExpr>>,
    /// The positions in `conditions` of the conditions in the order they
    /// are evaluated in.
    order: Vec<usize>,
}

impl PartialEq for Conjunction {
    fn eq(&self, other: &Self) -> bool {
        self.conditions == other.conditions && self.order == other.order
    }
}

impl Eq for Conjunction {}

impl Hash for Conjunction {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.conditions.hash(state);
        self.order.hash(state);
    }
}

impl fmt::Display for Conjunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", conjunction(self.conditions.iter().cloned()))
    }
}

impl PhysicalExpr for Conjunction {
    fn data_type(&self, _input_schema: &Schema) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn nullable(&self, input_schema: &Schema) -> Result<bool> {
        for condition in &self.conditions {
            if condition.nullable(input_schema)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn evaluate(&self, batch: &RecordBatch) -> Result<ColumnarValue> {
        let rows = batch.num_rows();
        let Some((&first, rest)) = self.order.split_first() else {
            return internal_err!("a conjunction without conditions");
        };
        let mut answers = boolean(self.conditions[first].evaluate(batch)?, rows)?;
        // The rows still undecided (true or null so far), and their
        // positions in `batch` once they are not all of its rows.
        let mut undecided = batch.clone();
        let mut positions: Option<Vec<u32>> = None;
        for &condition in rest {
            let condition = &self.conditions[condition];
            let open = answers.len() - false_count(&answers);
            if open == 0 {
                break;
            }
            let few = open as f64 <= SELECT_BELOW * answers.len() as f64
                || open as f64 <= SELECT_BELOW * rows as f64;
            if few && open < answers.len() {
                let keep = not_false(&answers);
                positions = Some(kept_positions(positions.as_deref(), &keep));
                undecided = filter_record_batch(&undecided, &keep)?;
                answers = filter(&answers, &keep)?.as_boolean().clone();
            }
            let next = boolean(condition.evaluate(&undecided)?, undecided.num_rows())?;
            answers = and_kleene(&answers, &next)?;
        }
        Ok(ColumnarValue::Array(Arc::new(match positions {
            None => answers,
            Some(positions) => scatter(&answers, &positions, rows),
        })))
    }

    fn children(&self) -> Vec<&Arc<dyn PhysicalExpr>> {
        self.conditions.iter().collect()
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn PhysicalExpr>>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        if children.len() != self.conditions.len() {
            return internal_err!(
                "a conjunction of {} conditions was given {} children",
                self.conditions.len(),
                children.len()
            );
        }
        Ok(Arc::new(Conjunction {
            conditions: children,
            order: self.order.clone(),
        }))
    }

    fn fmt_sql(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        conjunction(self.conditions.iter().cloned()).fmt_sql(f)
    }
}

/// `value` as a boolean array of `rows` rows.
fn boolean(value: ColumnarValue, rows: usize) -> Result<BooleanArray> {
    let array = value.into_array(rows)?;
    match array.as_boolean_opt() {
        Some(answers) => Ok(answers.clone()),
        None => internal_err!(
            "a condition of a conjunction gave {}, not booleans",
            array.data_type()
        ),
    }
}

/// How many of `answers` are false (not null).
fn false_count(answers: &BooleanArray) -> usize {
    match answers.nulls() {
        None => answers.len() - answers.values().count_set_bits(),
        Some(nulls) => (nulls.inner() & &!answers.values()).count_set_bits(),
    }
}

/// Which of `answers` are not false: true or null.
fn not_false(answers: &BooleanArray) -> BooleanArray {
    let values = match answers.nulls() {
        None => answers.values().clone(),
        Some(nulls) => answers.values() | &!nulls.inner(),
    };
    BooleanArray::new(values, None)
}

/// The positions in the batch of the rows `keep` keeps, of those at
/// `positions` (`None`: every row of the batch, in order).
fn kept_positions(positions: Option<&[u32]>, keep: &BooleanArray) -> Vec<u32> {
    let kept = keep.values().set_indices();
    match positions {
        // Batches hold far fewer than 2^32 rows.
        None => kept.map(|i| i as u32).collect(),
        Some(positions) => kept.map(|i| positions[i]).collect(),
    }
}

/// A batch's answers from those of the rows at `positions`: false at every
/// other row.
fn scatter(answers: &BooleanArray, positions: &[u32], rows: usize) -> BooleanArray {
    let mut values = BooleanBufferBuilder::new(rows);
    values.append_n(rows, false);
    for i in answers.values().set_indices() {
        values.set_bit(positions[i] as usize, true);
    }
    let nulls = answers
        .nulls()
        .filter(|nulls| nulls.null_count() > 0)
        .map(|nulls| {
            let mut valid = BooleanBufferBuilder::new(rows);
            valid.append_n(rows, true);
            for i in (0..answers.len()).filter(|&i| nulls.is_null(i)) {
                valid.set_bit(positions[i] as usize, false);
            }
            NullBuffer::new(valid.finish())
        });
    BooleanArray::new(values.finish(), nulls)
}

#[cfg(test)]
mod tests {
    use arrow::array::{ArrayRef, Int64Array};
    use arrow::datatypes::Field;
    use datafusion::common::ScalarValue;
    use datafusion::physical_expr::expressions::{Column, Literal};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// What `expr` answers for each row of `batch`.
    fn answers(expr: &dyn PhysicalExpr, batch: &RecordBatch) -> Result<ArrayRef> {
        expr.evaluate(batch)
            .and_then(|value| value.into_array(batch.num_rows()))
    }

    /// The same answers as DataFusion's `AND`s, nulls included, whether the
    /// conditions pass most rows, few or none, in any order.
    #[test]
    fn answers_as_datafusion_ands() {
        let mut rng = StdRng::seed_from_u64(11);
        for round in 0..300 {
            let rows = rng.random_range(0..300);
            let columns = rng.random_range(2..6);
            let mut fields = Vec::new();
            let mut arrays: Vec<ArrayRef> = Vec::new();
            for c in 0..columns {
                // How often a row is true, and null.
                let true_share = [0.02, 0.1, 0.5, 0.95, 1.0][rng.random_range(0..5)];
                let null_share = if round % 3 == 0 { 0.1 } else { 0.0 };
                let values: BooleanArray = (0..rows)
                    .map(|_| (!rng.random_bool(null_share)).then(|| rng.random_bool(true_share)))
                    .collect();
                fields.push(Field::new(format!("c{c}"), DataType::Boolean, true));
                arrays.push(Arc::new(values));
            }
            let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).expect("batch");
            let mut conditions: Vec<Arc<dyn PhysicalExpr>> = (0..columns)
                .map(|c| Arc::new(Column::new(&format!("c{c}"), c)) as Arc<dyn PhysicalExpr>)
                .collect();
            if round % 5 == 0 {
                conditions.push(Arc::new(Literal::new(ScalarValue::Boolean(Some(true)))));
            }
            let plain = conjunction(conditions.iter().cloned());
            let fast = conjunction_of(&plain, batch.schema_ref()).expect("an AND");
            assert_eq!(fast.conditions.len(), conditions.len());
            assert_eq!(fast.to_string(), plain.to_string());
            let want = answers(plain.as_ref(), &batch).expect("plain");
            let got = answers(&fast, &batch).expect("fast");
            assert_eq!(&want, &got, "round {round}: {plain}");
        }
    }

    /// 1 000 rows of `x`, zero but at every 50th row, and the conditions
    /// `x <> 0` and `100 / x > 20`, which divides by zero on the rows the
    /// first makes false; with the number of rows both keep.
    fn divisions() -> (
        RecordBatch,
        Arc<dyn PhysicalExpr>,
        Arc<dyn PhysicalExpr>,
        usize,
    ) {
        let x: ArrayRef = Arc::new(Int64Array::from_iter_values(
            (0..1000).map(|i| if i % 50 == 0 { i % 7 + 1 } else { 0 }),
        ));
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(schema, vec![x]).expect("batch");
        let column: Arc<dyn PhysicalExpr> = Arc::new(Column::new("x", 0));
        let literal = |v: i64| -> Arc<dyn PhysicalExpr> {
            Arc::new(Literal::new(ScalarValue::Int64(Some(v))))
        };
        let nonzero = compare(&column, Operator::NotEq, &literal(0));
        let quotient = compare(&literal(100), Operator::Divide, &column);
        let large = compare(&quotient, Operator::Gt, &literal(20));
        let kept = (0..1000)
            .filter(|i| i % 50 == 0 && 100 / (i % 7 + 1) > 20)
            .count();
        assert!(kept > 0);
        (batch, nonzero, large, kept)
    }

    /// A condition is not evaluated on rows an earlier one made false when
    /// few are left: `x <> 0 AND 100 / x > 20` divides no row by zero.
    #[test]
    fn later_conditions_skip_rows_already_false() {
        let (batch, nonzero, large, kept) = divisions();
        let plain = conjunction([nonzero, large]);
        let fast = conjunction_of(&plain, batch.schema_ref()).expect("an AND");
        let want = answers(plain.as_ref(), &batch).expect("plain");
        let got = answers(&fast, &batch).expect("fast");
        assert_eq!(&want, &got);
        assert_eq!(got.as_boolean().true_count(), kept);
    }

    fn compare(
        left: &Arc<dyn PhysicalExpr>,
        op: Operator,
        right: &Arc<dyn PhysicalExpr>,
    ) -> Arc<dyn PhysicalExpr> {
        Arc::new(BinaryExpr::new(Arc::clone(left), op, Arc::clone(right)))
    }

    /// Comparisons of fixed-width columns with constants run first, then
    /// those of two columns and lookups in lists, then the rest, each group
    /// as written; the conjunction still displays as written.
    #[test]
    fn cheap_conditions_run_first() {
        let schema = Schema::new(vec![
            Field::new("mode", DataType::Utf8View, true),
            Field::new("shipped", DataType::Date32, true),
            Field::new("received", DataType::Date32, true),
            Field::new("amount", DataType::Decimal128(15, 2), true),
        ]);
        let column = |name: &str| -> Arc<dyn PhysicalExpr> {
            Arc::new(Column::new_with_schema(name, &schema).expect("column"))
        };
        let constant =
            |value: ScalarValue| -> Arc<dyn PhysicalExpr> { Arc::new(Literal::new(value)) };
        let mail = constant(ScalarValue::Utf8View(Some("MAIL".into())));
        let day = constant(ScalarValue::Date32(Some(8766)));
        let conditions = vec![
            // 0: a string comparison.
            compare(&column("mode"), Operator::Eq, &mail),
            // 1: two date columns.
            compare(&column("shipped"), Operator::Lt, &column("received")),
            // 2: a date column and a constant, written on either side.
            compare(&day, Operator::LtEq, &column("received")),
            // 3: a lookup in a list of constants.
            Arc::new(
                InListExpr::try_new(
                    column("amount"),
                    vec![constant(ScalarValue::Decimal128(Some(100), 15, 2))],
                    false,
                    &schema,
                )
                .expect("a list"),
            ),
            // 4: a constant of another type than its column: not moved.
            compare(
                &column("amount"),
                Operator::Gt,
                &constant(ScalarValue::Int64(Some(1))),
            ),
            // 5: a null test and a constant comparison, or-ed.
            compare(
                &(Arc::new(IsNullExpr::new(column("shipped"))) as Arc<dyn PhysicalExpr>),
                Operator::Or,
                &compare(&column("shipped"), Operator::Gt, &day),
            ),
        ];
        let plain = conjunction(conditions.iter().cloned());
        let fast = conjunction_of(&plain, &schema).expect("an AND");
        assert_eq!(fast.order, vec![2, 5, 1, 3, 0, 4]);
        assert_eq!(fast.to_string(), plain.to_string());
        assert_eq!(
            fast.children().into_iter().cloned().collect::<Vec<_>>(),
            conditions
        );
    }

    /// Reordered, the conditions answer as DataFusion's `AND`s, nulls
    /// included: integer ranges, comparisons of two columns and string
    /// comparisons over random rows.
    #[test]
    fn reordered_conditions_answer_as_datafusion_ands() {
        let mut rng = StdRng::seed_from_u64(7);
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Int64, true),
            Field::new("s", DataType::Utf8View, true),
        ]));
        let a: Arc<dyn PhysicalExpr> = Arc::new(Column::new("a", 0));
        let b: Arc<dyn PhysicalExpr> = Arc::new(Column::new("b", 1));
        let s: Arc<dyn PhysicalExpr> = Arc::new(Column::new("s", 2));
        for round in 0..200 {
            let rows = rng.random_range(0..400);
            let int = |rng: &mut StdRng| -> ArrayRef {
                Arc::new(
                    (0..rows)
                        .map(|_| (!rng.random_bool(0.1)).then(|| rng.random_range(0..100)))
                        .collect::<Int64Array>(),
                )
            };
            let (first, second) = (int(&mut rng), int(&mut rng));
            let strings: ArrayRef = Arc::new(
                (0..rows)
                    .map(|_| {
                        (!rng.random_bool(0.1)).then(|| {
                            ["MAIL", "SHIP", "a longer value here"][rng.random_range(0..3)]
                        })
                    })
                    .collect::<arrow::array::StringViewArray>(),
            );
            let batch = RecordBatch::try_new(Arc::clone(&schema), vec![first, second, strings])
                .expect("batch");
            let number = |v: i64| -> Arc<dyn PhysicalExpr> {
                Arc::new(Literal::new(ScalarValue::Int64(Some(v))))
            };
            let text: Arc<dyn PhysicalExpr> =
                Arc::new(Literal::new(ScalarValue::Utf8View(Some("SHIP".into()))));
            let mut conditions = [
                compare(&s, Operator::Eq, &text),
                compare(&a, Operator::Lt, &b),
                compare(&a, Operator::GtEq, &number(rng.random_range(0..100))),
                compare(&b, Operator::Lt, &number(rng.random_range(0..100))),
            ];
            if round % 2 == 0 {
                conditions.reverse();
            }
            let plain = conjunction(conditions.iter().cloned());
            let fast = conjunction_of(&plain, &schema).expect("an AND");
            // The string comparison runs last, wherever it is written.
            let text_at = if round % 2 == 0 { 3 } else { 0 };
            assert_eq!(fast.order.last(), Some(&text_at));
            let want = answers(plain.as_ref(), &batch).expect("plain");
            let got = answers(&fast, &batch).expect("fast");
            assert_eq!(&want, &got, "round {round}: {plain}");
        }
    }

    /// A cheap condition written after one that fails on some rows runs
    /// first: `100 / x > 20 AND x <> 0` divides no row by zero once few
    /// rows are left, where DataFusion's `AND` divides every row.
    #[test]
    fn a_failing_condition_runs_after_a_cheaper_one() {
        let (batch, nonzero, large, kept) = divisions();
        let plain = conjunction([large, nonzero]);
        assert!(
            plain.evaluate(&batch).is_err(),
            "DataFusion divides by zero"
        );
        let fast = conjunction_of(&plain, batch.schema_ref()).expect("an AND");
        let got = answers(&fast, &batch).expect("no row divided by zero");
        assert_eq!(got.as_boolean().true_count(), kept);
    }
}
