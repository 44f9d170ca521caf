//! Binding a compiled policy to one caller: `current_user()`,
//! `user_attr('x')` and `has_group('g')` become typed literals (never text
//! pasted into SQL), then the expression is simplified.

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, StringArray};
use arrow::datatypes::{DataType, Schema};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::logical_expr::simplify::SimplifyContext;
use datafusion::logical_expr::{ColumnarValue, Expr, ExprSchemable, ScalarUDF};
use datafusion::optimizer::simplify_expressions::ExprSimplifier;

use super::PolicyError;
use super::compile::{CURRENT_USER, HAS_GROUP, USER_ATTR, caller_functions_as};
use crate::auth::CallerIdentity;

fn error(id: &str, message: impl Into<String>) -> PolicyError {
    PolicyError {
        id: id.to_string(),
        message: message.into(),
    }
}

/// Replaces the caller functions with literals and simplifies.
pub(super) fn bind_expr(
    expr: Expr,
    caller: &CallerIdentity,
    schema: &Schema,
    id: &str,
) -> Result<Expr, PolicyError> {
    let bound = expr
        .transform_up(|e| {
            let Expr::ScalarFunction(function) = &e else {
                return Ok(Transformed::no(e));
            };
            let argument = || match function.args.first() {
                Some(Expr::Literal(ScalarValue::Utf8(Some(text)), _)) => Some(text.clone()),
                _ => None,
            };
            let value = match function.func.name() {
                CURRENT_USER => ScalarValue::Utf8(Some(caller.user.clone())),
                USER_ATTR => ScalarValue::Utf8(
                    argument().and_then(|name| caller.attributes.get(&name).cloned()),
                ),
                HAS_GROUP => {
                    ScalarValue::Boolean(Some(argument().is_some_and(|g| caller.has_group(&g))))
                }
                _ => return Ok(Transformed::no(e)),
            };
            Ok(Transformed::yes(Expr::Literal(value, None)))
        })
        .map_err(|e| error(id, e.to_string()))?
        .data;
    let df_schema = DFSchema::try_from(schema.clone()).map_err(|e| error(id, e.to_string()))?;
    let simplifier = ExprSimplifier::new(
        SimplifyContext::builder()
            .with_schema(Arc::new(df_schema))
            .build(),
    );
    simplifier
        .simplify(bound)
        .map_err(|e| error(id, e.find_root().to_string()))
}

/// Evaluates a condition about the caller alone. NULL counts as false.
pub(super) fn caller_condition(
    expr: &Expr,
    caller: &CallerIdentity,
    id: &str,
) -> Result<bool, PolicyError> {
    match bind_expr(expr.clone(), caller, &Schema::empty(), id)? {
        Expr::Literal(ScalarValue::Boolean(value), _) => Ok(value == Some(true)),
        Expr::Literal(ScalarValue::Null, _) => Ok(false),
        other => Err(error(
            id,
            format!("does not reduce to true or false: {other}"),
        )),
    }
}

pub(super) fn expr_type(expr: &Expr, schema: &Schema, id: &str) -> Result<DataType, PolicyError> {
    let df_schema = DFSchema::try_from(schema.clone()).map_err(|e| error(id, e.to_string()))?;
    expr.get_type(&df_schema)
        .map_err(|e| error(id, e.to_string()))
}

/// The caller functions as they answer for `caller` in the caller's own
/// SQL and in the views it reads: `SELECT current_user` is the name the
/// gateway knows the caller by, `user_attr('region')` and
/// `has_group('analyst')` what policies see of them. They are stable within
/// a query, so the planner folds them into literals before any source is
/// asked.
pub(crate) fn caller_functions_for(caller: &Arc<CallerIdentity>) -> Vec<ScalarUDF> {
    let user = caller.user.clone();
    let attributes = Arc::clone(caller);
    let groups = Arc::clone(caller);
    caller_functions_as(
        Arc::new(move |_: &[ColumnarValue]| {
            Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(user.clone()))))
        }),
        Arc::new(move |args: &[ColumnarValue]| {
            per_name(args, |names| {
                let values: StringArray = names
                    .iter()
                    .map(|name| name.and_then(|name| attributes.attributes.get(name)))
                    .collect();
                Arc::new(values)
            })
        }),
        Arc::new(move |args: &[ColumnarValue]| {
            per_name(args, |names| {
                let values: BooleanArray = names
                    .iter()
                    .map(|name| name.map(|name| groups.has_group(name)))
                    .collect();
                Arc::new(values)
            })
        }),
    )
}

/// A function of one name applied to its argument, a value or a column
/// (NULL for a NULL name).
fn per_name(
    args: &[ColumnarValue],
    answer: impl Fn(&StringArray) -> ArrayRef,
) -> datafusion::common::Result<ColumnarValue> {
    let [argument] = args else {
        return datafusion::common::exec_err!("expected one argument, got {}", args.len());
    };
    let names = arrow::compute::cast(&argument.to_array(1)?, &DataType::Utf8)?;
    let answers = answer(datafusion::common::cast::as_string_array(&names)?);
    match argument {
        ColumnarValue::Scalar(_) => Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(
            &answers, 0,
        )?)),
        ColumnarValue::Array(_) => Ok(ColumnarValue::Array(answers)),
    }
}
