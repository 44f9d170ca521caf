//! Decimal sums, differences and products computed on 64-bit values where
//! the operands fit in them.
//!
//! Arrow holds a `DECIMAL(p, s)` with `p` up to 38 as a 128-bit integer
//! and computes `+`, `-` and `*` on two of them with 128-bit arithmetic
//! that checks every value for overflow, through a call per value: on
//! TPC-H q1, whose two products (`l_extendedprice * (1 - l_discount) *
//! (1 + l_tax)`) run over six million rows, that is a third of the query's
//! time. Prices, quantities and rates of up to 18 digits (`DECIMAL(15,
//! 2)` and the like) fit in 64 bits, and the product of two 64-bit values,
//! or the sum of two of them each scaled by a power of ten that fits in 64
//! bits, cannot overflow 128 bits: each such expression is wrapped in a
//! [`NarrowDecimal`] that, batch by batch, checks that
//! every operand fits in 64 bits and then computes the results with one
//! widening multiplication each and no checks. A batch with any wider
//! operand is computed as before, and fails as before where a value
//! overflows. The results, their type and the plan's display are the same
//! either way.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Decimal128Array};
use arrow::buffer::{NullBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, Decimal128Type, FieldRef, Schema};
use arrow::record_batch::RecordBatch;
use datafusion::common::{ScalarValue, internal_err};
use datafusion::error::Result;
use datafusion::logical_expr::interval_arithmetic::Interval;
use datafusion::logical_expr::sort_properties::ExprProperties;
use datafusion::logical_expr::{ColumnarValue, Operator};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::BinaryExpr;

/// The largest scale a fast sum or difference brings an operand to: ten to
/// this power still fits in 64 bits.
const MAX_RESCALE: i8 = 18;

/// `binary` wrapped in a [`NarrowDecimal`], if it is a `+`, `-` or `*` of
/// two decimals (as `schema` types them).
pub(super) fn narrow_decimal(binary: &BinaryExpr, schema: &Schema) -> Option<NarrowDecimal> {
    if !matches!(
        binary.op(),
        Operator::Plus | Operator::Minus | Operator::Multiply
    ) {
        return None;
    }
    let decimal = |side: &Arc<dyn PhysicalExpr>| {
        matches!(side.data_type(schema), Ok(DataType::Decimal128(..)))
    };
    (decimal(binary.left()) && decimal(binary.right())).then(|| NarrowDecimal {
        arithmetic: binary.clone(),
    })
}

/// A decimal `+`, `-` or `*` that computes each batch whose operands fit in
/// 64 bits without overflow checks, and any other batch as `arithmetic`
/// does. Displays, and compares, as `arithmetic`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct NarrowDecimal {
    arithmetic: BinaryExpr,
}

impl fmt::Display for NarrowDecimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.arithmetic, f)
    }
}

impl PhysicalExpr for NarrowDecimal {
    fn data_type(&self, input_schema: &Schema) -> Result<DataType> {
        self.arithmetic.data_type(input_schema)
    }

    fn nullable(&self, input_schema: &Schema) -> Result<bool> {
        self.arithmetic.nullable(input_schema)
    }

    fn return_field(&self, input_schema: &Schema) -> Result<FieldRef> {
        self.arithmetic.return_field(input_schema)
    }

    fn evaluate(&self, batch: &RecordBatch) -> Result<ColumnarValue> {
        let left = self.arithmetic.left().evaluate(batch)?;
        let right = self.arithmetic.right().evaluate(batch)?;
        match narrow(*self.arithmetic.op(), &left, &right)? {
            Some(result) => Ok(ColumnarValue::Array(result)),
            None => wide(*self.arithmetic.op(), &left, &right),
        }
    }

    fn children(&self) -> Vec<&Arc<dyn PhysicalExpr>> {
        vec![self.arithmetic.left(), self.arithmetic.right()]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn PhysicalExpr>>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        let arithmetic = Arc::new(self.arithmetic.clone()).with_new_children(children)?;
        let Some(arithmetic) = arithmetic.downcast_ref::<BinaryExpr>() else {
            return internal_err!("a decimal operation's new children gave {arithmetic}");
        };
        Ok(Arc::new(NarrowDecimal {
            arithmetic: arithmetic.clone(),
        }))
    }

    fn evaluate_bounds(&self, children: &[&Interval]) -> Result<Interval> {
        self.arithmetic.evaluate_bounds(children)
    }

    fn get_properties(&self, children: &[ExprProperties]) -> Result<ExprProperties> {
        self.arithmetic.get_properties(children)
    }

    fn fmt_sql(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.arithmetic.fmt_sql(f)
    }
}

/// One operand of a decimal operation: a column of values or one value for
/// every row.
enum Operand<'a> {
    Column(&'a Decimal128Array),
    Value(i128),
}

impl<'a> Operand<'a> {
    /// The operand and its precision and scale, if it is a decimal that is
    /// not a null value.
    fn of(value: &'a ColumnarValue) -> Option<(Self, u8, i8)> {
        match value {
            ColumnarValue::Array(array) => match array.data_type() {
                DataType::Decimal128(p, s) => Some((
                    Operand::Column(array.as_primitive::<Decimal128Type>()),
                    *p,
                    *s,
                )),
                _ => None,
            },
            ColumnarValue::Scalar(ScalarValue::Decimal128(Some(v), p, s)) => {
                Some((Operand::Value(*v), *p, *s))
            }
            ColumnarValue::Scalar(_) => None,
        }
    }

    /// Whether every value, those under nulls included, fits in 64 bits.
    fn fits(&self) -> bool {
        match self {
            Operand::Column(column) => column
                .values()
                .iter()
                .fold(true, |fits, &v| fits & (i128::from(v as i64) == v)),
            Operand::Value(v) => i128::from(*v as i64) == *v,
        }
    }
}

/// `left op right` computed on 64-bit operands, or `None` when an operand
/// is not a decimal column or value, does not fit, or when both are single
/// values: those are computed by Arrow's kernel.
fn narrow(op: Operator, left: &ColumnarValue, right: &ColumnarValue) -> Result<Option<ArrayRef>> {
    let (Some((l, p1, s1)), Some((r, p2, s2))) = (Operand::of(left), Operand::of(right)) else {
        return Ok(None);
    };
    if !(0..=38).contains(&s1) || !(0..=38).contains(&s2) || !l.fits() || !r.fits() {
        return Ok(None);
    }
    let Some(operands) = Operands::new(l, r) else {
        return Ok(None);
    };
    // Arrow's result types (Hive's rules), as its kernel computes them.
    let (precision, scale, values) = match op {
        Operator::Multiply => {
            let scale = s1 + s2;
            if scale > 38 {
                return Ok(None);
            }
            let precision = p1.saturating_add(p2 + 1).min(38);
            (
                precision,
                scale,
                operands.apply(|a, b| i128::from(a) * i128::from(b)),
            )
        }
        Operator::Plus | Operator::Minus => {
            let scale = s1.max(s2);
            if scale - s1 > MAX_RESCALE || scale - s2 > MAX_RESCALE {
                return Ok(None);
            }
            let digits = (p1 as i8 - s1).max(p2 as i8 - s2);
            let precision = (scale.saturating_add(digits) as u8)
                .saturating_add(1)
                .min(38);
            let (lm, rm) = (
                10i64.pow((scale - s1) as u32),
                10i64.pow((scale - s2) as u32),
            );
            let values = if op == Operator::Plus {
                operands
                    .apply(|a, b| i128::from(a) * i128::from(lm) + i128::from(b) * i128::from(rm))
            } else {
                operands
                    .apply(|a, b| i128::from(a) * i128::from(lm) - i128::from(b) * i128::from(rm))
            };
            (precision, scale, values)
        }
        _ => return Ok(None),
    };
    let result = Decimal128Array::try_new(values, operands.nulls())?
        .with_precision_and_scale(precision, scale)?;
    Ok(Some(Arc::new(result)))
}

/// The operands of a decimal operation over a batch, each known to fit in
/// 64 bits: two columns, or a column and one value for every row.
enum Operands<'a> {
    Columns(&'a Decimal128Array, &'a Decimal128Array),
    ColumnValue(&'a Decimal128Array, i64),
    ValueColumn(i64, &'a Decimal128Array),
}

impl<'a> Operands<'a> {
    /// `left` and `right`, unless both are single values.
    fn new(left: Operand<'a>, right: Operand<'a>) -> Option<Self> {
        match (left, right) {
            (Operand::Column(l), Operand::Column(r)) => Some(Operands::Columns(l, r)),
            (Operand::Column(l), Operand::Value(r)) => Some(Operands::ColumnValue(l, r as i64)),
            (Operand::Value(l), Operand::Column(r)) => Some(Operands::ValueColumn(l as i64, r)),
            (Operand::Value(_), Operand::Value(_)) => None,
        }
    }

    /// `f` of each row's operands.
    fn apply(&self, f: impl Fn(i64, i64) -> i128) -> ScalarBuffer<i128> {
        match self {
            Operands::Columns(l, r) => l
                .values()
                .iter()
                .zip(r.values().iter())
                .map(|(&a, &b)| f(a as i64, b as i64))
                .collect(),
            Operands::ColumnValue(l, b) => l.values().iter().map(|&a| f(a as i64, *b)).collect(),
            Operands::ValueColumn(a, r) => r.values().iter().map(|&b| f(*a, b as i64)).collect(),
        }
    }

    /// The rows whose result is null: those where a column is.
    fn nulls(&self) -> Option<NullBuffer> {
        match self {
            Operands::Columns(l, r) => NullBuffer::union(l.nulls(), r.nulls()),
            Operands::ColumnValue(column, _) | Operands::ValueColumn(_, column) => {
                column.nulls().cloned()
            }
        }
    }
}

/// `left op right` computed by Arrow's kernel, as `BinaryExpr` computes it
/// (decimal kernels check for overflow whichever variant is called).
fn wide(op: Operator, left: &ColumnarValue, right: &ColumnarValue) -> Result<ColumnarValue> {
    use arrow::compute::kernels::numeric::{add_wrapping, mul_wrapping, sub_wrapping};
    use datafusion::physical_expr_common::datum::apply as kernel;
    match op {
        Operator::Plus => kernel(left, right, add_wrapping),
        Operator::Minus => kernel(left, right, sub_wrapping),
        Operator::Multiply => kernel(left, right, mul_wrapping),
        _ => internal_err!("{op} is not a decimal operation computed here"),
    }
}

#[cfg(test)]
mod tests {
    use arrow::datatypes::Field;
    use datafusion::physical_expr::expressions::{Column, Literal};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn column(values: Vec<Option<i128>>, precision: u8, scale: i8) -> ArrayRef {
        Arc::new(
            Decimal128Array::from(values)
                .with_precision_and_scale(precision, scale)
                .expect("decimal type"),
        )
    }

    /// `left op right` through the plain expression and through the narrow
    /// one, on a batch of the two columns, each as an array.
    fn both(
        left: Arc<dyn PhysicalExpr>,
        op: Operator,
        right: Arc<dyn PhysicalExpr>,
        batch: &RecordBatch,
    ) -> (Result<ArrayRef>, Result<ArrayRef>) {
        let arithmetic = BinaryExpr::new(left, op, right);
        let rows = batch.num_rows();
        let plain = arithmetic.evaluate(batch).and_then(|v| v.into_array(rows));
        let narrow = NarrowDecimal { arithmetic }
            .evaluate(batch)
            .and_then(|v| v.into_array(rows));
        (plain, narrow)
    }

    fn batch(left: ArrayRef, right: ArrayRef) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("l", left.data_type().clone(), true),
            Field::new("r", right.data_type().clone(), true),
        ]));
        RecordBatch::try_new(schema, vec![left, right]).expect("batch")
    }

    /// The same answers, types and errors as Arrow's kernels, for columns
    /// of every width of value (those past 64 bits included, and nulls),
    /// for column and column, column and value, and value and column.
    #[test]
    fn answers_as_arrow_computes_them() {
        let mut rng = StdRng::seed_from_u64(7);
        let types = [
            (15u8, 2i8),
            (16, 2),
            (38, 0),
            (38, 10),
            (18, 18),
            (5, 0),
            (38, 30),
        ];
        let mut narrow_arrays = 0;
        for round in 0..400 {
            let (p1, s1) = types[rng.random_range(0..types.len())];
            let (p2, s2) = types[rng.random_range(0..types.len())];
            // Most rounds fit in 64 bits; some hold one value that does not,
            // some hold values that overflow 128 bits when multiplied.
            let bits = match round % 4 {
                0 => 40,
                1 => 62,
                2 => 63,
                _ => 126,
            };
            let value = |rng: &mut StdRng| -> Option<i128> {
                if rng.random_range(0..10) == 0 {
                    return None;
                }
                let magnitude = rng.random_range(0..(1i128 << (bits - 1)));
                Some(if rng.random() { magnitude } else { -magnitude })
            };
            let rows = rng.random_range(1..200);
            let mut l: Vec<Option<i128>> = (0..rows).map(|_| value(&mut rng)).collect();
            let r: Vec<Option<i128>> = (0..rows).map(|_| value(&mut rng)).collect();
            if round % 8 == 2 {
                l[rows / 2] = Some(i128::from(i64::MAX) + 1);
            }
            let batch = batch(column(l.clone(), p1, s1), column(r.clone(), p2, s2));
            let scalar = ScalarValue::Decimal128(r[0], p2, s2);
            for op in [Operator::Plus, Operator::Minus, Operator::Multiply] {
                let pairs: [(Arc<dyn PhysicalExpr>, Arc<dyn PhysicalExpr>); 3] = [
                    (Arc::new(Column::new("l", 0)), Arc::new(Column::new("r", 1))),
                    (
                        Arc::new(Column::new("l", 0)),
                        Arc::new(Literal::new(scalar.clone())),
                    ),
                    (
                        Arc::new(Literal::new(scalar.clone())),
                        Arc::new(Column::new("l", 0)),
                    ),
                ];
                for (left, right) in pairs {
                    let context = format!("{left} {op} {right}: ({p1}, {s1}) and ({p2}, {s2})");
                    let (plain, narrow) = both(left, op, right, &batch);
                    match (plain, narrow) {
                        (Ok(plain), Ok(narrow)) => {
                            assert_eq!(plain.data_type(), narrow.data_type(), "{context}");
                            assert_eq!(&plain, &narrow, "{context}");
                            narrow_arrays += 1;
                        }
                        (Err(plain), Err(narrow)) => {
                            assert_eq!(plain.to_string(), narrow.to_string(), "{context}");
                        }
                        (plain, narrow) => {
                            panic!("{context}: plain {plain:?}, narrow {narrow:?}")
                        }
                    }
                }
            }
        }
        assert!(narrow_arrays > 1000, "{narrow_arrays} answers compared");
    }

    /// The fast path is taken exactly when every operand fits in 64 bits.
    #[test]
    fn computes_on_64_bits_only_when_every_operand_fits() {
        let fits = column(vec![Some(1), None, Some(i128::from(i64::MIN))], 38, 2);
        let wider = column(vec![Some(1), None, Some(i128::from(i64::MIN) - 1)], 38, 2);
        let small = ColumnarValue::Array(column(vec![Some(3), Some(4), Some(5)], 15, 2));
        let narrowed = narrow(Operator::Multiply, &ColumnarValue::Array(fits), &small)
            .expect("narrow")
            .expect("fits in 64 bits");
        assert_eq!(narrowed.data_type(), &DataType::Decimal128(38, 4));
        let narrowed = narrowed.as_primitive::<Decimal128Type>();
        assert_eq!(narrowed.value(0), 3);
        assert!(narrowed.is_null(1));
        assert_eq!(narrowed.value(2), i128::from(i64::MIN) * 5);
        let wide =
            narrow(Operator::Multiply, &ColumnarValue::Array(wider), &small).expect("narrow");
        assert!(wide.is_none(), "a value past 64 bits is computed by Arrow");
        let null = ColumnarValue::Scalar(ScalarValue::Decimal128(None, 15, 2));
        assert!(
            narrow(Operator::Plus, &small, &null)
                .expect("narrow")
                .is_none()
        );
    }
}
