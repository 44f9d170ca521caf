//! Binding a compiled policy to one caller: `current_user()`,
//! `user_attr('x')` and `has_group('g')` become typed literals (never text
//! pasted into SQL), then the expression is simplified.

use std::sync::Arc;

use arrow::datatypes::{DataType, Schema};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::logical_expr::simplify::SimplifyContext;
use datafusion::logical_expr::{Expr, ExprSchemable};
use datafusion::optimizer::simplify_expressions::ExprSimplifier;

use super::PolicyError;
use super::compile::{CURRENT_USER, HAS_GROUP, USER_ATTR};
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
