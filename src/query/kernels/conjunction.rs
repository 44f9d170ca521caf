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
use datafusion::physical_expr::expressions::BinaryExpr;
use datafusion::physical_expr::utils::{conjunction, split_conjunction};

/// The share of a batch's rows below which the undecided rows are copied
/// out before the next condition: DataFusion's threshold for evaluating an
/// `AND`'s right side on the rows its left side passes.
const SELECT_BELOW: f64 = 0.2;

/// `expr`'s conditions as a [`Conjunction`], if it is an `AND` of at least
/// two conditions.
pub(super) fn conjunction_of(expr: &Arc<dyn PhysicalExpr>) -> Option<Conjunction> {
    let binary = expr.downcast_ref::<BinaryExpr>()?;
    if *binary.op() != Operator::And {
        return None;
    }
    let conditions: Vec<_> = split_conjunction(expr).into_iter().cloned().collect();
    (conditions.len() > 1).then_some(Conjunction { conditions })
}

/// An `AND` of conditions, evaluated in order on the rows still undecided.
/// Displays as the `AND` it replaces.
#[derive(Debug, Clone)]
pub(crate) struct Conjunction {
    conditions: Vec<Arc<dyn PhysicalExpr>>,
}

impl PartialEq for Conjunction {
    fn eq(&self, other: &Self) -> bool {
        self.conditions == other.conditions
    }
}

impl Eq for Conjunction {}

impl Hash for Conjunction {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.conditions.hash(state);
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
        let Some((first, rest)) = self.conditions.split_first() else {
            return internal_err!("a conjunction without conditions");
        };
        let mut answers = boolean(first.evaluate(batch)?, rows)?;
        // The rows still undecided (true or null so far), and their
        // positions in `batch` once they are not all of its rows.
        let mut undecided = batch.clone();
        let mut positions: Option<Vec<u32>> = None;
        for condition in rest {
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
            let fast = conjunction_of(&plain).expect("an AND");
            assert_eq!(fast.conditions.len(), conditions.len());
            assert_eq!(fast.to_string(), plain.to_string());
            let want = plain
                .evaluate(&batch)
                .and_then(|v| v.into_array(rows))
                .expect("plain");
            let got = fast
                .evaluate(&batch)
                .and_then(|v| v.into_array(rows))
                .expect("fast");
            assert_eq!(&want, &got, "round {round}: {plain}");
        }
    }

    /// A condition is not evaluated on rows an earlier one made false when
    /// few are left: `x <> 0 AND 100 / x > 1` divides no row by zero.
    #[test]
    fn later_conditions_skip_rows_already_false() {
        let x: ArrayRef = Arc::new(Int64Array::from_iter_values(
            (0..1000).map(|i| if i % 50 == 0 { i % 7 + 1 } else { 0 }),
        ));
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(schema, vec![x]).expect("batch");
        let column: Arc<dyn PhysicalExpr> = Arc::new(Column::new("x", 0));
        let literal = |v: i64| -> Arc<dyn PhysicalExpr> {
            Arc::new(Literal::new(ScalarValue::Int64(Some(v))))
        };
        let nonzero: Arc<dyn PhysicalExpr> = Arc::new(BinaryExpr::new(
            Arc::clone(&column),
            Operator::NotEq,
            literal(0),
        ));
        let quotient: Arc<dyn PhysicalExpr> =
            Arc::new(BinaryExpr::new(literal(100), Operator::Divide, column));
        let large: Arc<dyn PhysicalExpr> =
            Arc::new(BinaryExpr::new(quotient, Operator::Gt, literal(20)));
        let plain = conjunction([nonzero, large]);
        let fast = conjunction_of(&plain).expect("an AND");
        let want = plain
            .evaluate(&batch)
            .and_then(|v| v.into_array(1000))
            .expect("plain");
        let got = fast
            .evaluate(&batch)
            .and_then(|v| v.into_array(1000))
            .expect("fast");
        assert_eq!(&want, &got);
        let expected = (0..1000)
            .filter(|i| i % 50 == 0 && 100 / (i % 7 + 1) > 20)
            .count();
        assert!(expected > 0);
        assert_eq!(got.as_boolean().true_count(), expected);
    }
}
