//! Integer negation that fails on overflow.
//!
//! DataFusion negates a column with Arrow's wrapping kernel: the negation of
//! the smallest `BIGINT` is itself, a wrong value given as right. (The
//! negation of a constant is checked already.) [`CheckedNegative`] negates
//! with Arrow's checked kernel and displays as the negation it replaces.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use arrow::compute::kernels::numeric::neg;
use arrow::datatypes::{DataType, FieldRef, Schema};
use arrow::record_batch::RecordBatch;
use datafusion::common::internal_err;
use datafusion::error::Result;
use datafusion::logical_expr::ColumnarValue;
use datafusion::logical_expr::interval_arithmetic::Interval;
use datafusion::logical_expr::sort_properties::ExprProperties;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::NegativeExpr;

/// `expr` negating with a check for overflow, if it is the negation of a
/// signed integer (as `schema` types it).
pub(super) fn checked_negative(
    expr: &Arc<dyn PhysicalExpr>,
    schema: &Schema,
) -> Option<CheckedNegative> {
    let negation = expr.downcast_ref::<NegativeExpr>()?;
    negation
        .arg()
        .data_type(schema)
        .is_ok_and(|data_type| data_type.is_signed_integer())
        .then(|| CheckedNegative {
            negation: Arc::clone(expr),
            arg: Arc::clone(negation.arg()),
        })
}

/// The negation of a signed integer, failing where a value has no
/// negation in its type. Displays, and compares, as `negation`.
#[derive(Debug, Clone)]
pub(crate) struct CheckedNegative {
    /// A [`NegativeExpr`].
    negation: Arc<dyn PhysicalExpr>,
    /// What it negates.
    arg: Arc<dyn PhysicalExpr>,
}

impl PartialEq for CheckedNegative {
    fn eq(&self, other: &Self) -> bool {
        self.negation.as_ref() == other.negation.as_ref()
    }
}

impl Eq for CheckedNegative {}

impl Hash for CheckedNegative {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.negation.as_ref().hash(state);
    }
}

impl fmt::Display for CheckedNegative {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.negation, f)
    }
}

impl PhysicalExpr for CheckedNegative {
    fn data_type(&self, input_schema: &Schema) -> Result<DataType> {
        self.negation.data_type(input_schema)
    }

    fn nullable(&self, input_schema: &Schema) -> Result<bool> {
        self.negation.nullable(input_schema)
    }

    fn return_field(&self, input_schema: &Schema) -> Result<FieldRef> {
        self.negation.return_field(input_schema)
    }

    fn evaluate(&self, batch: &RecordBatch) -> Result<ColumnarValue> {
        match self.arg.evaluate(batch)? {
            ColumnarValue::Array(values) => Ok(ColumnarValue::Array(neg(values.as_ref())?)),
            // A constant's negation is checked.
            ColumnarValue::Scalar(_) => self.negation.evaluate(batch),
        }
    }

    fn children(&self) -> Vec<&Arc<dyn PhysicalExpr>> {
        vec![&self.arg]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn PhysicalExpr>>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        let negation = Arc::clone(&self.negation).with_new_children(children)?;
        let Some(arg) = negation
            .downcast_ref::<NegativeExpr>()
            .map(NegativeExpr::arg)
        else {
            return internal_err!("a negation's new children gave {negation}");
        };
        let arg = Arc::clone(arg);
        Ok(Arc::new(CheckedNegative { negation, arg }))
    }

    fn evaluate_bounds(&self, children: &[&Interval]) -> Result<Interval> {
        self.negation.evaluate_bounds(children)
    }

    fn get_properties(&self, children: &[ExprProperties]) -> Result<ExprProperties> {
        self.negation.get_properties(children)
    }

    fn fmt_sql(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.negation.fmt_sql(f)
    }
}
