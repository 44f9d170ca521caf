//! Which expressions a source computes as meshgate does: the same rows
//! pass, the same values come out, and what fails here fails there. Only
//! those are sent; the rest run in meshgate over the rows the source sends.

use arrow::datatypes::DataType;
use datafusion::common::tree_node::TreeNode;
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::logical_expr::expr::{AggregateFunction, ScalarFunction};
use datafusion::logical_expr::{BinaryExpr, Expr, ExprSchemable, Operator};

use super::Dialect;

/// Scalar functions every supported dialect spells and computes like
/// DataFusion does. (`lower` and `upper` are not among them: SQLite's and
/// PostgreSQL's under the `C` collation change ASCII letters only, and
/// PostgreSQL's `upper('ß')` is `ß` where DataFusion's is `SS`.)
const PORTABLE_FUNCTIONS: &[&str] = &["abs", "coalesce", "nullif"];
/// More functions PostgreSQL computes like DataFusion. (Not `ln`, `exp`
/// or `power`, which fail in PostgreSQL where DataFusion answers NaN or
/// infinity, nor `regexp_replace`, whose patterns PostgreSQL reads in
/// another regular expression language.)
const POSTGRES_FUNCTIONS: &[&str] = &[
    "substr",
    "character_length",
    "length",
    "trim",
    "btrim",
    "ltrim",
    "rtrim",
    "concat",
    "replace",
    "starts_with",
    "floor",
    "ceil",
    "sqrt",
    "date_trunc",
];
const AGGREGATES: &[&str] = &["count", "sum", "min", "max", "avg"];

/// Whether `expr`, over the columns of `schema`, means the same in the
/// source as in DataFusion: the same rows pass, the same values come out,
/// and what fails here fails there.
pub(crate) fn expr_pushable(expr: &Expr, schema: &DFSchema, dialect: Dialect) -> bool {
    !expr
        .exists(|e| Ok(!node_expr_pushable(e, schema, dialect)))
        .unwrap_or(true)
}

fn node_expr_pushable(expr: &Expr, schema: &DFSchema, dialect: Dialect) -> bool {
    match expr {
        Expr::Column(_) | Expr::Alias(_) => true,
        Expr::Literal(value, _) => literal_pushable(value, dialect),
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq
            | Operator::And
            | Operator::Or => true,
            Operator::Plus | Operator::Minus | Operator::Multiply => {
                !integer_math_unchecked(expr, schema, dialect)
            }
            Operator::Divide | Operator::Modulo => division_pushable(left, *op, right, schema),
            _ => false,
        },
        Expr::Not(_)
        | Expr::IsNull(_)
        | Expr::IsNotNull(_)
        | Expr::IsTrue(_)
        | Expr::IsFalse(_)
        | Expr::IsNotTrue(_)
        | Expr::IsNotFalse(_)
        | Expr::Between(_)
        | Expr::InList(_)
        | Expr::Case(_) => true,
        Expr::Negative(_) => !integer_math_unchecked(expr, schema, dialect),
        // SQLite's LIKE ignores case.
        Expr::Like(like) => {
            dialect != Dialect::Sqlite && !like.case_insensitive && like.escape_char.is_none()
        }
        Expr::Cast(cast) => match cast.expr.get_type(schema) {
            Ok(from) => cast_pushable(&from, cast.field.data_type(), dialect),
            Err(_) => false,
        },
        Expr::ScalarFunction(ScalarFunction { func, .. }) => {
            let name = func.name();
            PORTABLE_FUNCTIONS.contains(&name)
                || (dialect == Dialect::Postgres && POSTGRES_FUNCTIONS.contains(&name))
        }
        Expr::AggregateFunction(AggregateFunction { func, params }) => {
            AGGREGATES.contains(&func.name())
                && params.filter.is_none()
                && params.order_by.is_empty()
                && params.null_treatment.is_none()
                // SQLite keeps decimals as floating point: sums would drift.
                && !(dialect == Dialect::Sqlite
                    && params.args.iter().any(|a| matches!(a, Expr::Cast(c) if matches!(c.field.data_type(), DataType::Decimal128(..)))))
                // An average of decimals: DataFusion cuts it at its scale,
                // PostgreSQL's is rounded there as it is read.
                && !(func.name() == "avg"
                    && params.args.iter().any(|a| matches!(a.get_type(schema), Ok(DataType::Decimal128(..)) | Err(_))))
        }
        _ => false,
    }
}

/// Whether `expr` is integer arithmetic the source does not check for
/// overflow: SQLite's turns into floating point where meshgate's fails
/// (`9223372036854775807 + n > 0` keeps the row there).
fn integer_math_unchecked(expr: &Expr, schema: &DFSchema, dialect: Dialect) -> bool {
    dialect == Dialect::Sqlite && expr.get_type(schema).map_or(true, |t| t.is_integer())
}

/// Whether `left / right` or `left % right` is computed alike: by a
/// constant other than zero (DataFusion fails on a zero divisor of
/// integers and answers infinity for floating point, PostgreSQL fails on
/// both, SQLite answers NULL), not of decimals (whose quotients the
/// source rounds to a scale of its own), and `%` of integers only
/// (PostgreSQL has no `%` of floating point, SQLite's drops the fraction).
fn division_pushable(left: &Expr, op: Operator, right: &Expr, schema: &DFSchema) -> bool {
    let nonzero_constant = match right {
        Expr::Literal(value, _) => {
            !value.is_null()
                && value.data_type().is_numeric()
                && ScalarValue::new_zero(&value.data_type()).is_ok_and(|zero| zero != *value)
        }
        _ => false,
    };
    let (Ok(left_type), Ok(right_type)) = (left.get_type(schema), right.get_type(schema)) else {
        return false;
    };
    let types_alike = match op {
        Operator::Modulo => left_type.is_integer() && right_type.is_integer(),
        _ => {
            (left_type.is_integer() && right_type.is_integer())
                || (left_type.is_floating() && right_type.is_floating())
        }
    };
    nonzero_constant && types_alike
}

/// Whether a cast from `from` to `to` gives the source's value: between
/// integers, from integers to floating point, decimals or text, between
/// floating point types, from decimals to floating point, and to a decimal
/// of the same scale. Other casts round where DataFusion truncates
/// (floating point or decimals to integers), format otherwise (floating
/// point, dates and timestamps to text) or parse otherwise (text to
/// anything).
fn cast_pushable(from: &DataType, to: &DataType, dialect: Dialect) -> bool {
    use DataType::*;
    if !type_pushable(to, dialect) {
        return false;
    }
    match (from, to) {
        (Null, _) => true,
        _ if from == to => true,
        (f, t)
            if f.is_integer() && (t.is_numeric() || matches!(t, Utf8 | LargeUtf8 | Utf8View)) =>
        {
            true
        }
        (f, t) if f.is_floating() && t.is_floating() => true,
        (Decimal128(..), t) if t.is_floating() => true,
        (Decimal128(_, from_scale), Decimal128(_, to_scale)) => from_scale == to_scale,
        (Utf8 | LargeUtf8 | Utf8View, Utf8 | LargeUtf8 | Utf8View) => true,
        (Boolean, Boolean) => true,
        _ => false,
    }
}

fn literal_pushable(value: &ScalarValue, dialect: Dialect) -> bool {
    value.is_null() || type_pushable(&value.data_type(), dialect)
}

/// Types whose literals and casts the source reads as DataFusion does.
fn type_pushable(data_type: &DataType, dialect: Dialect) -> bool {
    use DataType::*;
    match data_type {
        Null | Boolean | Int8 | Int16 | Int32 | Int64 | Float32 | Float64 | Utf8 | LargeUtf8
        | Utf8View => true,
        // SQLite stores dates as text and decimals as floating point.
        Decimal128(..) | Date32 => dialect != Dialect::Sqlite,
        _ => false,
    }
}
