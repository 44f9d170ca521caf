//! Compiling policy text into typed DataFusion expressions, once, when the
//! config loads. Each expression is parsed and type-checked against the
//! product's schema; a policy that does not compile withdraws its product
//! (fail closed) with a message naming domain, product and policy.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DFSchema};
use datafusion::logical_expr::simplify::SimplifyContext;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ExprSchemable, ScalarFunctionImplementation, ScalarUDF, Volatility,
    create_udf,
};
use datafusion::optimizer::simplify_expressions::ExprSimplifier;
use datafusion::prelude::SessionContext;

use super::{ColumnAction, ColumnRule, PolicyRule, ProductPolicy};
use crate::config::{DefaultAccess, PolicyConfig, ProductConfig, ProductSource, TagPolicyConfig};

pub(crate) const CURRENT_USER: &str = "current_user";
pub(crate) const USER_ATTR: &str = "user_attr";
pub(crate) const HAS_GROUP: &str = "has_group";

/// The caller functions, as planning stubs: they are replaced by typed
/// literals for each caller and never run.
pub(crate) fn caller_functions() -> Vec<ScalarUDF> {
    let unbound = |name: &'static str| -> ScalarFunctionImplementation {
        Arc::new(move |_: &[ColumnarValue]| {
            datafusion::common::exec_err!("{name}() is bound per caller and cannot run here")
        })
    };
    caller_functions_as(
        unbound(CURRENT_USER),
        unbound(USER_ATTR),
        unbound(HAS_GROUP),
    )
}

/// `current_user()`, `user_attr(name)` and `has_group(name)`, each with its
/// signature, computed by the implementations given.
pub(crate) fn caller_functions_as(
    current_user: ScalarFunctionImplementation,
    user_attr: ScalarFunctionImplementation,
    has_group: ScalarFunctionImplementation,
) -> Vec<ScalarUDF> {
    vec![
        create_udf(
            CURRENT_USER,
            vec![],
            DataType::Utf8,
            Volatility::Stable,
            current_user,
        ),
        create_udf(
            USER_ATTR,
            vec![DataType::Utf8],
            DataType::Utf8,
            Volatility::Stable,
            user_attr,
        ),
        create_udf(
            HAS_GROUP,
            vec![DataType::Utf8],
            DataType::Boolean,
            Volatility::Stable,
            has_group,
        ),
    ]
}

/// Parses and checks policy expressions against one schema.
struct ExprCompiler {
    context: SessionContext,
    schema: Arc<DFSchema>,
}

/// What an expression is for, which decides what it may contain.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ExprRole {
    /// `access`, `unless`: about the caller only, boolean.
    CallerCondition,
    /// `row_filter`: over the product's columns, boolean.
    RowFilter,
    /// `mask`: over the product's columns, any type.
    Mask,
}

impl ExprCompiler {
    fn new(schema: &Schema) -> Result<Self, String> {
        let context = SessionContext::new();
        for function in caller_functions() {
            context.register_udf(function);
        }
        let schema = DFSchema::try_from(schema.clone()).map_err(|e| e.to_string())?;
        Ok(Self {
            context,
            schema: Arc::new(schema),
        })
    }

    fn compile(&self, sql: &str, role: ExprRole) -> Result<Expr, String> {
        let state = self.context.state();
        let expr = state
            .create_logical_expr(&without_current_user_parentheses(sql)?, &self.schema)
            .map_err(|e| e.find_root().to_string())?;
        let simplifier = ExprSimplifier::new(
            SimplifyContext::builder()
                .with_schema(Arc::clone(&self.schema))
                .build(),
        );
        let expr = simplifier
            .coerce(expr, &self.schema)
            .map_err(|e| e.find_root().to_string())?;
        check_shape(&expr)?;
        let data_type = expr
            .get_type(&self.schema)
            .map_err(|e| e.find_root().to_string())?;
        if role != ExprRole::Mask && !matches!(data_type, DataType::Boolean | DataType::Null) {
            return Err(format!(
                "must be a boolean expression, but `{sql}` is {data_type}"
            ));
        }
        if role == ExprRole::CallerCondition && !expr.column_refs().is_empty() {
            return Err(format!(
                "may use only current_user(), user_attr() and has_group(), not columns: `{sql}`"
            ));
        }
        Ok(expr)
    }
}

/// `sql` with each `current_user()` written `current_user`. The SQL parser
/// reads `CURRENT_USER` as a keyword that takes no parentheses, and
/// policies call it as the function it is.
pub(crate) fn without_current_user_parentheses(sql: &str) -> Result<String, String> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::keywords::Keyword;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

    // Unescaped, each token is written back as it was read.
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .with_unescape(false)
        .tokenize()
        .map_err(|e| e.to_string())?;
    let is_space = |token: &Token| matches!(token, Token::Whitespace(_));
    let mut kept = Vec::with_capacity(tokens.len());
    let mut rest = tokens.iter().peekable();
    let mut changed = false;
    while let Some(token) = rest.next() {
        kept.push(token);
        if !matches!(token, Token::Word(w) if w.keyword == Keyword::CURRENT_USER && w.quote_style.is_none())
        {
            continue;
        }
        let mut after = rest.clone().skip_while(|t| is_space(t));
        if after.next() == Some(&Token::LParen)
            && after.find(|t| !is_space(t)) == Some(&Token::RParen)
        {
            while rest.next() != Some(&Token::RParen) {}
            changed = true;
        }
    }
    if !changed {
        return Ok(sql.to_string());
    }
    Ok(kept.iter().map(ToString::to_string).collect())
}

/// The names of the columns `sql` reads, as the SQL planner resolves them
/// (unquoted names in lower case).
pub(crate) fn columns_read(sql: &str) -> Result<std::collections::BTreeSet<String>, String> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    let sql = without_current_user_parentheses(sql)?;
    let expr = Parser::new(&GenericDialect {})
        .try_with_sql(&sql)
        .and_then(|mut parser| parser.parse_expr())
        .map_err(|e| e.to_string())?;
    Ok(names_in(&expr))
}

/// The names parsed SQL holds where an expression may name a column (the
/// last part of a qualified name), as the SQL planner reads them: unquoted
/// ones in lower case.
pub(crate) fn names_in<T: datafusion::sql::sqlparser::ast::Visit>(
    sql: &T,
) -> std::collections::BTreeSet<String> {
    use std::ops::ControlFlow;

    use datafusion::sql::sqlparser::ast::{Expr as SqlExpr, Ident, visit_expressions};

    let name = |ident: &Ident| match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_lowercase(),
    };
    let mut names = std::collections::BTreeSet::new();
    let _ = visit_expressions(sql, |e| {
        match e {
            SqlExpr::Identifier(ident) => {
                names.insert(name(ident));
            }
            SqlExpr::CompoundIdentifier(parts) => {
                if let Some(last) = parts.last() {
                    names.insert(name(last));
                }
            }
            _ => {}
        }
        ControlFlow::<()>::Continue(())
    });
    names
}

/// Refuses what a policy expression may not contain, and caller functions
/// whose argument is not a string literal.
fn check_shape(expr: &Expr) -> Result<(), String> {
    let mut problem = None;
    expr.apply(|e| {
        let found = match e {
            Expr::AggregateFunction(_) => Some("aggregate functions are not allowed".to_string()),
            Expr::WindowFunction(_) => Some("window functions are not allowed".to_string()),
            Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_) => {
                Some("subqueries are not allowed".to_string())
            }
            Expr::Placeholder(_) => Some("placeholders are not allowed".to_string()),
            Expr::ScalarFunction(function)
                if matches!(function.func.name(), USER_ATTR | HAS_GROUP)
                    && !matches!(function.args.as_slice(), [Expr::Literal(value, _)] if value.data_type() == DataType::Utf8) =>
            {
                Some(format!("{}() takes one string literal", function.func.name()))
            }
            _ => None,
        };
        match found {
            Some(message) => {
                problem = Some(message);
                Ok(datafusion::common::tree_node::TreeNodeRecursion::Stop)
            }
            None => Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue),
        }
    })
    .map_err(|e| e.to_string())?;
    match problem {
        Some(message) => Err(message),
        None => Ok(()),
    }
}

/// Compiles every policy that applies to one product.
pub(crate) fn compile_product_policy(
    domain: &str,
    product: &ProductConfig,
    schema: &Schema,
    policies: &[(usize, &PolicyConfig)],
    tag_policies: &[TagPolicyConfig],
    default_access: DefaultAccess,
) -> Result<ProductPolicy, String> {
    let compiler = ExprCompiler::new(schema)?;
    let name = format!("{domain}.{}", product.name);
    // A table product with declared columns holds others for its policies
    // alone. (A view's columns are what its SQL selects; what it declares
    // describes them.)
    let describes_only = matches!(product.source, ProductSource::View { .. });
    let policy_only: Vec<usize> = if product.columns.is_empty() || describes_only {
        Vec::new()
    } else {
        (0..schema.fields().len())
            .filter(|&i| {
                !product
                    .columns
                    .iter()
                    .any(|c| c.name == *schema.field(i).name())
            })
            .collect()
    };
    let mut compiled = ProductPolicy {
        default_access,
        policy_only,
        ..ProductPolicy::default()
    };
    let unless = |index: usize, text: &Option<String>, key: &str| -> Result<Option<Expr>, String> {
        text.as_deref()
            .map(|sql| {
                compiler
                    .compile(sql, ExprRole::CallerCondition)
                    .map_err(|e| format!("policies[{index}].{key}.unless: {e}"))
            })
            .transpose()
    };

    for (index, policy) in policies {
        let index = *index;
        if let Some(sql) = &policy.access {
            let expr = compiler
                .compile(sql, ExprRole::CallerCondition)
                .map_err(|e| format!("policies[{index}].access: {e}"))?;
            compiled.access.push(PolicyRule {
                id: format!("{name}#policies[{index}].access"),
                expr,
            });
        }
        if let Some(sql) = &policy.row_filter {
            let expr = compiler
                .compile(sql, ExprRole::RowFilter)
                .map_err(|e| format!("policies[{index}].row_filter: {e}"))?;
            compiled.row_filters.push(PolicyRule {
                id: format!("{name}#policies[{index}].row_filter"),
                expr,
            });
        }
        for (column, rule) in &policy.columns {
            let key = format!("columns.{column}");
            let Some(position) = schema
                .index_of(column)
                .ok()
                .filter(|i| !compiled.policy_only.contains(i))
            else {
                return Err(format!(
                    "policies[{index}].{key}: product `{name}` has no column `{column}`"
                ));
            };
            let action = if rule.deny {
                ColumnAction::Deny
            } else {
                let sql = rule.mask.as_deref().unwrap_or("NULL");
                let expr = compiler
                    .compile(sql, ExprRole::Mask)
                    .map_err(|e| format!("policies[{index}].{key}.mask: {e}"))?;
                ColumnAction::Mask(expr)
            };
            compiled.columns.push(ColumnRule {
                id: format!("{name}#policies[{index}].{key}"),
                column: position,
                action,
                unless: unless(index, &rule.unless, &key)?,
            });
        }
    }

    for (index, tag_policy) in tag_policies.iter().enumerate() {
        for declared in product
            .columns
            .iter()
            .filter(|c| c.tags.iter().any(|t| t == &tag_policy.tag))
        {
            let Ok(position) = schema.index_of(&declared.name) else {
                continue;
            };
            let key = format!(
                "governance.tag_policies[{index}] (tag `{}`)",
                tag_policy.tag
            );
            let action = if tag_policy.deny {
                ColumnAction::Deny
            } else {
                let sql = tag_policy.mask.as_deref().unwrap_or("NULL");
                ColumnAction::Mask(
                    compile_tag_mask(schema, &declared.name, sql)
                        .map_err(|e| format!("{key}.mask on `{}`: {e}", declared.name))?,
                )
            };
            let unless = tag_policy
                .unless
                .as_deref()
                .map(|sql| {
                    compiler
                        .compile(sql, ExprRole::CallerCondition)
                        .map_err(|e| format!("{key}.unless: {e}"))
                })
                .transpose()?;
            compiled.columns.push(ColumnRule {
                id: format!("{key} on {name}.{}", declared.name),
                column: position,
                action,
                unless,
            });
        }
    }
    Ok(compiled)
}

/// A tag policy's mask names the tagged column's value `value`.
fn compile_tag_mask(schema: &Schema, column: &str, sql: &str) -> Result<Expr, String> {
    const VALUE: &str = "value";
    let data_type = schema
        .field_with_name(column)
        .map_err(|e| e.to_string())?
        .data_type()
        .clone();
    let mut fields: Vec<Field> = schema
        .fields()
        .iter()
        .filter(|f| f.name() != VALUE)
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(VALUE, data_type, true));
    let with_value = Schema::new(fields);
    let expr = ExprCompiler::new(&with_value)?.compile(sql, ExprRole::Mask)?;
    expr.transform(|e| match e {
        Expr::Column(c) if c.name == VALUE => Ok(Transformed::yes(Expr::Column(
            Column::new_unqualified(column),
        ))),
        other => Ok(Transformed::no(other)),
    })
    .map(|t| t.data)
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_user_is_called_with_or_without_parentheses() {
        for (written, read) in [
            ("current_user() = 'ann'", "current_user = 'ann'"),
            ("CURRENT_USER ( /* me */ ) = 'ann'", "CURRENT_USER = 'ann'"),
            ("current_user = 'ann'", "current_user = 'ann'"),
            // Literals, quoted names and comments keep their text.
            (
                "owner = current_user() AND note <> 'current_user()' AND \"current_user\"() -- x()",
                "owner = current_user AND note <> 'current_user()' AND \"current_user\"() -- x()",
            ),
            (
                "name = 'it''s' OR current_user()<>''",
                "name = 'it''s' OR current_user<>''",
            ),
        ] {
            assert_eq!(without_current_user_parentheses(written).unwrap(), read);
        }
    }

    #[test]
    fn policies_compile_with_current_user() {
        let schema = Schema::new(vec![Field::new("owner", DataType::Utf8, true)]);
        let compiler = ExprCompiler::new(&schema).unwrap();
        for (sql, role) in [
            ("current_user() = 'ann'", ExprRole::CallerCondition),
            ("owner = current_user()", ExprRole::RowFilter),
            (
                "CASE WHEN owner = current_user() THEN owner END",
                ExprRole::Mask,
            ),
        ] {
            let expr = compiler
                .compile(sql, role)
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            let mut calls = 0;
            expr.apply(|e| {
                if matches!(e, Expr::ScalarFunction(f) if f.func.name() == CURRENT_USER) {
                    calls += 1;
                }
                Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
            })
            .unwrap();
            assert_eq!(calls, 1, "{sql}: {expr}");
        }
    }
}
