//! Leakproof predicates: the caller's filters that may run below a row filter.
//!
//! A predicate is leakproof when evaluating it on any row can neither fail nor
//! signal anything but its boolean result, so running it on rows the caller
//! may not see reveals nothing (PostgreSQL's LEAKPROOF rule). Only these are
//! pushed into a source below the row filter, where they still prune row
//! groups and pages. The list, deliberately short:
//!
//! - column references and literals;
//! - comparisons `=`, `<>`, `<`, `<=`, `>`, `>=`, `IS [NOT] DISTINCT FROM`;
//! - `AND`, `OR`, `NOT`;
//! - `IS [NOT] NULL`, `IS [NOT] TRUE / FALSE / UNKNOWN`;
//! - `BETWEEN` and `IN (...)` with literal bounds and lists;
//! - `[NOT] LIKE` / `ILIKE` with a literal pattern and no escape character;
//! - `TRY_CAST` of a leakproof expression, `CAST` of a literal.
//!
//! Everything else (arithmetic, which can overflow or divide by zero; casts of
//! columns, which can fail; function calls; regular expressions, whose
//! patterns can fail to compile; subqueries) runs above the row filter.

use datafusion::logical_expr::{Expr, Operator};

/// Whether `op` compares its operands (`=`, `<>`, `<`, `<=`, `>`, `>=`,
/// `IS [NOT] DISTINCT FROM`).
pub(crate) fn is_comparison(op: Operator) -> bool {
    matches!(
        op,
        Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq
            | Operator::IsDistinctFrom
            | Operator::IsNotDistinctFrom
    )
}

/// Whether `expr` may be evaluated on rows the caller cannot see.
pub(crate) fn is_leakproof(expr: &Expr) -> bool {
    match expr {
        Expr::Column(_) | Expr::Literal(..) => true,
        Expr::BinaryExpr(binary) => {
            (is_comparison(binary.op) || matches!(binary.op, Operator::And | Operator::Or))
                && is_leakproof(&binary.left)
                && is_leakproof(&binary.right)
        }
        Expr::Not(inner)
        | Expr::IsNull(inner)
        | Expr::IsNotNull(inner)
        | Expr::IsTrue(inner)
        | Expr::IsFalse(inner)
        | Expr::IsUnknown(inner)
        | Expr::IsNotTrue(inner)
        | Expr::IsNotFalse(inner)
        | Expr::IsNotUnknown(inner) => is_leakproof(inner),
        Expr::Between(between) => {
            is_leakproof(&between.expr) && is_literal(&between.low) && is_literal(&between.high)
        }
        Expr::InList(in_list) => is_leakproof(&in_list.expr) && in_list.list.iter().all(is_literal),
        Expr::Like(like) => {
            like.escape_char.is_none() && is_leakproof(&like.expr) && is_literal(&like.pattern)
        }
        Expr::TryCast(cast) => is_leakproof(&cast.expr),
        Expr::Cast(cast) => is_literal(&cast.expr),
        _ => false,
    }
}

fn is_literal(expr: &Expr) -> bool {
    match expr {
        Expr::Literal(..) => true,
        Expr::Cast(cast) => is_literal(&cast.expr),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Not;

    use super::is_leakproof;
    use datafusion::functions::expr_fn::{abs, upper};
    use datafusion::prelude::{col, lit};

    #[test]
    fn comparisons_null_tests_and_lists_are_leakproof() {
        assert!(is_leakproof(&col("a").eq(lit(5))));
        assert!(is_leakproof(&col("a").gt(lit(1)).and(col("b").is_null())));
        assert!(is_leakproof(&col("a").in_list(vec![lit(1), lit(2)], false)));
        assert!(is_leakproof(&col("a").between(lit(1), lit(9))));
        assert!(is_leakproof(&col("s").like(lit("A%"))));
        assert!(is_leakproof(&col("a").eq(col("b")).not()));
    }

    #[test]
    fn arithmetic_functions_casts_and_subqueries_are_not() {
        assert!(!is_leakproof(&(lit(1) / col("a")).eq(lit(1))));
        assert!(!is_leakproof(&(col("a") + lit(1)).gt(lit(1))));
        assert!(!is_leakproof(&upper(col("s")).eq(lit("X"))));
        assert!(!is_leakproof(&abs(col("a")).eq(lit(1))));
        assert!(!is_leakproof(
            &datafusion::prelude::cast(col("s"), arrow::datatypes::DataType::Int64).eq(lit(1))
        ));
        assert!(!is_leakproof(&col("a").in_list(vec![col("b")], false)));
        assert!(!is_leakproof(&col("a").between(lit(1), col("b"))));
    }
}
