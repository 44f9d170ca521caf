//! Access policies, enforced at query time (DESIGN §3).
//!
//! Policies are compiled once when the config loads ([`compile`]), bound to
//! each caller as typed literals when the caller's session resolves a
//! product ([`ProductPolicy::for_caller`]), and enforced by wrapping the
//! product's table in a [`PolicyTable`], whose scan is a [`PolicyExec`]
//! barrier: the row filter and the masks run on the raw rows inside it, and
//! nothing the caller wrote runs below it except leakproof filters on
//! unmasked columns ([`leakproof`]).
//!
//! Combination: access rules are AND-ed (none: `governance.default_access`);
//! row filters are AND-ed, and a NULL result hides the row; for a column,
//! an applying deny beats any mask, and among applying masks the product's
//! own come first, then tag policies, in config order.

mod bind;
mod compile;
mod exec;
mod explain;
mod leakproof;
mod row_filter;
mod table;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::logical_expr::Expr;

pub(crate) use bind::caller_functions_for;
pub(crate) use compile::{
    caller_functions, columns_read, compile_product_policy, names_in,
    without_current_user_parentheses,
};
pub use exec::PolicyExec;
pub(crate) use exec::coarse;
pub use explain::render_plan;
pub(crate) use leakproof::is_comparison;
pub(crate) use table::dictionary_type;
pub(crate) use table::unqualified;
pub use table::{DictionaryScan, PolicyParts, PolicyTable, ScanRequest, WhereTrue};

use crate::auth::CallerIdentity;
use crate::config::DefaultAccess;

/// A compiled rule: its id (for audit) and its expression.
#[derive(Debug, Clone)]
pub struct PolicyRule {
    pub id: String,
    pub expr: Expr,
}

#[derive(Debug, Clone)]
pub enum ColumnAction {
    Mask(Expr),
    Deny,
}

/// A mask or deny on one column, unless the caller meets a condition.
#[derive(Debug, Clone)]
pub struct ColumnRule {
    pub id: String,
    /// Index of the column in the product's schema.
    pub column: usize,
    pub action: ColumnAction,
    pub unless: Option<Expr>,
}

/// Every policy of one product, compiled.
#[derive(Debug, Clone)]
pub struct ProductPolicy {
    pub default_access: DefaultAccess,
    pub access: Vec<PolicyRule>,
    pub row_filters: Vec<PolicyRule>,
    pub columns: Vec<ColumnRule>,
    /// Columns of the product's schema that it does not publish (only its
    /// policies and its domain's views read them): no caller sees them.
    pub policy_only: Vec<usize>,
}

impl Default for ProductPolicy {
    fn default() -> Self {
        Self {
            default_access: DefaultAccess::Authenticated,
            access: Vec::new(),
            row_filters: Vec::new(),
            columns: Vec::new(),
            policy_only: Vec::new(),
        }
    }
}

/// How one caller sees one column.
#[derive(Debug, Clone)]
pub enum ColumnView {
    Plain,
    /// The caller sees `expr` (over the raw columns) instead of the value.
    Masked {
        expr: Expr,
        data_type: DataType,
    },
    Denied,
}

/// One product as one caller sees it.
#[derive(Debug, Clone)]
pub struct CallerProductView {
    pub visible: bool,
    /// The AND of the bound row filters; rows where it is not true are hidden.
    pub row_filter: Option<Expr>,
    /// One entry per column of the product's schema.
    pub columns: Vec<ColumnView>,
    /// Ids of the rules that restrict this caller, for the audit log.
    pub applied: Vec<String>,
}

impl CallerProductView {
    /// Every row and every raw value of a product with `columns` columns.
    pub fn unrestricted(columns: usize) -> Self {
        Self {
            visible: true,
            row_filter: None,
            columns: vec![ColumnView::Plain; columns],
            applied: Vec::new(),
        }
    }

    /// Whether the caller sees every row and every raw value.
    pub fn is_unrestricted(&self) -> bool {
        self.row_filter.is_none() && self.columns.iter().all(|c| matches!(c, ColumnView::Plain))
    }

    /// The product's schema as this caller sees it: denied columns absent,
    /// masked columns typed by their mask.
    pub fn caller_schema(&self, schema: &Schema) -> SchemaRef {
        let fields: Vec<Field> = schema
            .fields()
            .iter()
            .zip(&self.columns)
            .filter_map(|(field, view)| match view {
                ColumnView::Plain => Some(field.as_ref().clone()),
                ColumnView::Masked { data_type, .. } => {
                    Some(Field::new(field.name(), data_type.clone(), true))
                }
                ColumnView::Denied => None,
            })
            .collect();
        std::sync::Arc::new(Schema::new(fields))
    }
}

/// Why a policy could not be bound for a caller. The product is then
/// invisible to that caller (fail closed).
#[derive(Debug, thiserror::Error)]
#[error("policy {id}: {message}")]
pub struct PolicyError {
    pub id: String,
    pub message: String,
}

impl ProductPolicy {
    /// Every row and every raw value of the product's `columns` columns,
    /// except those only its policies read.
    pub fn unrestricted(&self, columns: usize) -> CallerProductView {
        let mut view = CallerProductView::unrestricted(columns);
        for &column in &self.policy_only {
            view.columns[column] = ColumnView::Denied;
        }
        view
    }

    /// What a view of the product's domain that names `names` sees of the
    /// product (of `schema`) for a caller who sees `view`: the same rows,
    /// values and masks, and the unpublished columns the view names.
    pub fn for_view(
        &self,
        view: &CallerProductView,
        schema: &Schema,
        names: &std::collections::BTreeSet<String>,
    ) -> CallerProductView {
        let mut for_view = view.clone();
        for &column in &self.policy_only {
            if names.contains(schema.field(column).name()) {
                for_view.columns[column] = ColumnView::Plain;
            }
        }
        for_view
    }

    /// Binds every rule to `caller` and decides what they see.
    pub fn for_caller(
        &self,
        caller: &CallerIdentity,
        schema: &Schema,
    ) -> Result<CallerProductView, PolicyError> {
        let mut applied = Vec::new();
        let visible = if self.access.is_empty() {
            self.default_access == DefaultAccess::Authenticated
        } else {
            let mut all = true;
            for rule in &self.access {
                all &= bind::caller_condition(&rule.expr, caller, &rule.id)?;
            }
            all
        };
        if !visible {
            return Ok(CallerProductView {
                visible,
                row_filter: None,
                columns: vec![ColumnView::Denied; schema.fields().len()],
                applied,
            });
        }

        let mut row_filter: Option<Expr> = None;
        for rule in &self.row_filters {
            let bound = bind::bind_expr(rule.expr.clone(), caller, schema, &rule.id)?;
            if matches!(
                &bound,
                Expr::Literal(datafusion::common::ScalarValue::Boolean(Some(true)), _)
            ) {
                continue;
            }
            applied.push(rule.id.clone());
            row_filter = Some(match row_filter {
                Some(existing) => existing.and(bound),
                None => bound,
            });
        }

        let mut columns = vec![ColumnView::Plain; schema.fields().len()];
        let mut denied = vec![false; columns.len()];
        for rule in &self.columns {
            let exempt = match &rule.unless {
                Some(condition) => bind::caller_condition(condition, caller, &rule.id)?,
                None => false,
            };
            if exempt {
                continue;
            }
            match &rule.action {
                ColumnAction::Deny => {
                    if !denied[rule.column] {
                        denied[rule.column] = true;
                        columns[rule.column] = ColumnView::Denied;
                        applied.push(rule.id.clone());
                    }
                }
                ColumnAction::Mask(expr) => {
                    if denied[rule.column]
                        || matches!(columns[rule.column], ColumnView::Masked { .. })
                    {
                        continue;
                    }
                    let field = schema.field(rule.column);
                    let mut bound = bind::bind_expr(expr.clone(), caller, schema, &rule.id)?;
                    let mut data_type = bind::expr_type(&bound, schema, &rule.id)?;
                    if data_type == DataType::Null {
                        bound = datafusion::prelude::cast(bound, field.data_type().clone());
                        data_type = field.data_type().clone();
                    }
                    columns[rule.column] = ColumnView::Masked {
                        expr: bound,
                        data_type,
                    };
                    applied.push(rule.id.clone());
                }
            }
        }
        for &column in &self.policy_only {
            columns[column] = ColumnView::Denied;
        }
        Ok(CallerProductView {
            visible,
            row_filter,
            columns,
            applied,
        })
    }
}
