//! A product's table as a restricted caller sees it.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::datatypes::{DataType, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::DFSchema;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::Result;
use datafusion::logical_expr::Operator;
use datafusion::logical_expr::utils::{conjunction, split_conjunction};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{Column as ColumnExpr, binary};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::filter::FilterExec;

use super::leakproof::is_leakproof;
use super::row_filter::{compares_with_constants_only, fast_string_equality, with_plain_constants};
use super::{CallerProductView, ColumnView, PolicyExec};

/// The type a string column is read as when read as a dictionary.
pub(crate) fn dictionary_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// A wrapped table that can read some of its string columns as
/// [`dictionary_type`], and knows something of the values its files store
/// (a Parquet product, see the catalog). The barrier asks for the columns
/// only its row filter reads, only to compare them with constants: those it
/// then compares once per distinct value. And it asks for the row filter's
/// conditions over one column to be shown true for every row from what the
/// files say of that column, so as to neither read nor check them.
#[async_trait]
pub trait DictionaryScan: std::fmt::Debug + Send + Sync {
    /// Scans like [`TableProvider::scan`], with those of the request's
    /// `dictionaries` that it can decode as dictionaries read so.
    async fn scan_with_dictionaries(
        &self,
        state: &dyn Session,
        request: &ScanRequest,
    ) -> Result<Arc<dyn ExecutionPlan>>;

    /// Scans like [`Self::scan_with_dictionaries`], provided each of
    /// `conditions` is shown true for every row of every file the scan
    /// reads; otherwise tells which may be. Each condition is deterministic
    /// and reads only the column named beside it.
    async fn scan_where_true(
        &self,
        state: &dyn Session,
        request: &ScanRequest,
        conditions: &[(Expr, String)],
    ) -> Result<WhereTrue>;
}

/// What [`DictionaryScan::scan_where_true`] did.
#[derive(Debug)]
pub enum WhereTrue {
    /// Every condition was shown: the scan, which reads none of them.
    Scan(Arc<dyn ExecutionPlan>),
    /// Not every condition was shown: for each, whether it may be (false
    /// when it was not, over these files or recently).
    Shown(Vec<bool>),
}

/// What a scan under the barrier reads from the wrapped table.
#[derive(Debug)]
pub struct ScanRequest {
    /// The columns (indices in the wrapped table's schema).
    pub projection: Vec<usize>,
    /// Those of them that may be read as dictionaries.
    pub dictionaries: BTreeSet<usize>,
    /// The filters offered to the wrapped table.
    pub filters: Vec<Expr>,
    /// The limit it may apply.
    pub limit: Option<usize>,
}

/// What [`PolicyTable::parts`] returns: the wrapped table, the row filter,
/// and each visible column.
pub type PolicyParts<'a> = (
    &'a Arc<dyn TableProvider>,
    Option<&'a Expr>,
    &'a [(usize, ColumnView)],
);

/// Wraps a product's table with the caller's row filter, masks and denials.
/// It reports no statistics, so no answer is computed from source metadata;
/// its barrier gives the join planner coarse estimates only.
#[derive(Debug)]
pub struct PolicyTable {
    product: String,
    inner: Arc<dyn TableProvider>,
    /// `inner`, when it can read string columns as dictionaries.
    dictionaries: Option<Arc<dyn DictionaryScan>>,
    /// For each column of the caller's schema: its index in the product's
    /// schema, and how the caller sees it.
    columns: Vec<(usize, ColumnView)>,
    row_filter: Option<Expr>,
    schema: SchemaRef,
}

impl PolicyTable {
    /// The table for `view`; the product's own table when nothing restricts
    /// the caller. `dictionaries` is `inner` itself, when it can read string
    /// columns as dictionaries.
    pub fn wrap(
        product: String,
        inner: Arc<dyn TableProvider>,
        dictionaries: Option<Arc<dyn DictionaryScan>>,
        view: &CallerProductView,
    ) -> Arc<dyn TableProvider> {
        if view.is_unrestricted() {
            return inner;
        }
        let base = inner.schema();
        let schema = view.caller_schema(&base);
        let columns = view
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| !matches!(c, ColumnView::Denied))
            .map(|(index, c)| (index, c.clone()))
            .collect();
        Arc::new(Self {
            product,
            inner,
            dictionaries,
            columns,
            row_filter: view.row_filter.clone(),
            schema,
        })
    }

    /// The wrapped table, the caller's row filter, and each visible column
    /// (its index in the wrapped table's schema, and how the caller sees it).
    pub fn parts(&self) -> PolicyParts<'_> {
        (&self.inner, self.row_filter.as_ref(), &self.columns)
    }

    /// Whether a caller's filter may run below the row filter: it must be
    /// leakproof and read only columns the caller sees unmasked.
    fn may_push_down(&self, filter: &Expr) -> bool {
        let base = self.inner.schema();
        is_leakproof(filter)
            && filter.column_refs().iter().all(|column| {
                self.columns.iter().any(|(index, view)| {
                    matches!(view, ColumnView::Plain) && base.field(*index).name() == &column.name
                })
            })
    }
}

#[async_trait]
impl TableProvider for PolicyTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // A filter that may run below the row filter is applied exactly by
        // the filter under the barrier (see `scan`), whatever the wrapped
        // table does with it, so it is not evaluated a second time above.
        Ok(filters
            .iter()
            .map(|f| {
                if self.may_push_down(f) {
                    TableProviderFilterPushDown::Exact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let wanted: Vec<usize> = match projection {
            Some(projection) => projection.clone(),
            None => (0..self.columns.len()).collect(),
        };
        // The row filter's conditions over one column each may be shown true
        // for every row the scan reads (from a Parquet product's dictionary
        // pages and statistics): the scan then neither reads nor checks
        // them.
        if let (Some(row_filter), Some(source)) = (&self.row_filter, &self.dictionaries) {
            let mut provable: Vec<(Expr, String)> = Vec::new();
            let mut rest: Vec<Expr> = Vec::new();
            for condition in split_conjunction(row_filter) {
                match self.single_column(condition) {
                    Some(column) => provable.push((condition.clone(), column)),
                    None => rest.push(condition.clone()),
                }
            }
            // Those not shown are checked; the others are tried again
            // (over the files listed then), once.
            for _ in 0..2 {
                if provable.is_empty() {
                    break;
                }
                let checked = conjunction(rest.clone());
                let reads = self.reads(&wanted, filters, limit, checked.as_ref())?;
                let shown = match source.scan_where_true(state, &reads, &provable).await? {
                    WhereTrue::Scan(input) => {
                        return self.barrier(state, input, &wanted, filters, checked.as_ref());
                    }
                    WhereTrue::Shown(shown) => shown,
                };
                if shown.iter().all(|&holds| !holds) {
                    break;
                }
                let mut still = Vec::new();
                for ((condition, column), holds) in provable.into_iter().zip(shown) {
                    if holds {
                        still.push((condition, column));
                    } else {
                        rest.push(condition);
                    }
                }
                provable = still;
            }
        }
        let row_filter = self.row_filter.as_ref();
        let reads = self.reads(&wanted, filters, limit, row_filter)?;
        let input = match &self.dictionaries {
            Some(scan) if !reads.dictionaries.is_empty() => {
                scan.scan_with_dictionaries(state, &reads).await?
            }
            _ => {
                self.inner
                    .scan(state, Some(&reads.projection), &reads.filters, reads.limit)
                    .await?
            }
        };
        self.barrier(state, input, &wanted, filters, row_filter)
    }
}

impl PolicyTable {
    /// The column `condition` alone reads, when it reads one and nothing
    /// else, always to the same effect (no volatile function, no subquery,
    /// no placeholder): its truth for every row can then be shown from what
    /// is known of the column's values.
    fn single_column(&self, condition: &Expr) -> Option<String> {
        let columns = condition.column_refs();
        let [column] = columns.into_iter().collect::<Vec<_>>()[..] else {
            return None;
        };
        self.inner.schema().field_with_name(&column.name).ok()?;
        let mut plain = !condition.is_volatile();
        // Visiting cannot fail.
        let _ = condition.apply(|e| {
            if matches!(
                e,
                Expr::ScalarSubquery(_)
                    | Expr::InSubquery(_)
                    | Expr::Exists(_)
                    | Expr::SetComparison(_)
                    | Expr::OuterReferenceColumn(..)
                    | Expr::Placeholder(_)
            ) {
                plain = false;
            }
            Ok(if plain {
                TreeNodeRecursion::Continue
            } else {
                TreeNodeRecursion::Stop
            })
        });
        plain.then(|| column.name.clone())
    }

    /// What a scan that keeps the `wanted` columns, under the caller's
    /// `filters` and `row_filter`, reads from the wrapped table.
    fn reads(
        &self,
        wanted: &[usize],
        filters: &[Expr],
        limit: Option<usize>,
        row_filter: Option<&Expr>,
    ) -> Result<ScanRequest> {
        let base = self.inner.schema();

        // The raw columns the barrier needs: those the requested columns are
        // computed from, the caller's filters', and the row filter's.
        let mut needed: BTreeSet<usize> = BTreeSet::new();
        let add_refs = |expr: &Expr, needed: &mut BTreeSet<usize>| {
            for column in expr.column_refs() {
                if let Ok(index) = base.index_of(&column.name) {
                    needed.insert(index);
                }
            }
        };
        for filter in filters {
            add_refs(filter, &mut needed);
        }
        for &position in wanted {
            match &self.columns[position].1 {
                ColumnView::Masked { expr, .. } => add_refs(expr, &mut needed),
                _ => {
                    needed.insert(self.columns[position].0);
                }
            }
        }
        // String columns the row filter alone reads, only to compare them
        // with constants, may be read as dictionaries: never seen, only
        // compared, and compared once per distinct value.
        let mut dictionaries: BTreeSet<usize> = BTreeSet::new();
        if let Some(filter) = row_filter {
            let mut read = BTreeSet::new();
            add_refs(filter, &mut read);
            dictionaries = read
                .difference(&needed)
                .copied()
                .filter(|&index| compares_with_constants_only(filter, base.field(index).name()))
                .collect();
            needed.extend(read);
        }

        // A limit may pass only when no row is hidden and no filter is
        // left for the barrier's own filter to apply.
        let limit = if row_filter.is_none() && filters.is_empty() {
            limit
        } else {
            None
        };
        // The filters the wrapped table can use go to it too, where they can
        // narrow what is read (row groups and pages pruned by statistics, a
        // WHERE sent to a database), and so does the row filter; the filter
        // below the barrier and the barrier itself apply them to every row.
        let mut scan_filters: Vec<Expr> = Vec::with_capacity(filters.len() + 1);
        let offered: Vec<&Expr> = filters.iter().chain(row_filter).collect();
        for (filter, support) in offered
            .iter()
            .zip(self.inner.supports_filters_pushdown(&offered)?)
        {
            if matches!(
                support,
                TableProviderFilterPushDown::Exact | TableProviderFilterPushDown::Inexact
            ) {
                scan_filters.push((*filter).clone());
            }
        }
        Ok(ScanRequest {
            projection: needed.into_iter().collect(),
            dictionaries,
            filters: scan_filters,
            limit,
        })
    }

    /// The barrier over `input` (which reads what [`Self::reads`] named):
    /// the filter below it, then the row filter and the masks.
    fn barrier(
        &self,
        state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        wanted: &[usize],
        filters: &[Expr],
        row_filter: Option<&Expr>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let base = self.inner.schema();
        let input_schema = input.schema();
        let df_schema = DFSchema::try_from(input_schema.as_ref().clone())?;

        // Below the barrier, the caller's leakproof filters, which the
        // physical optimizer pushes into the scan (row-group and page
        // pruning), then the row filter: evaluated last, it reads only the
        // rows the caller's filters keep. (Leakproof filters never fail nor
        // reveal what they read, so running them first on rows the row
        // filter hides is safe.) The barrier relies on this filter only
        // while, as the plan runs, it still holds the row filter. Both
        // compare the row filter's string equalities fast (see
        // `fast_string_equality`).
        let row_filter = match row_filter {
            Some(filter) => {
                let read_as_dictionaries: Vec<&str> = df_schema
                    .fields()
                    .iter()
                    .filter(|field| *field.data_type() == dictionary_type())
                    .map(|field| field.name().as_str())
                    .collect();
                let filter = with_plain_constants(filter.clone(), &read_as_dictionaries)?;
                Some(fast_string_equality(
                    state.create_physical_expr(filter, &df_schema)?,
                )?)
            }
            None => None,
        };
        let callers = conjunction(filters.iter().map(unqualified))
            .map(|f| state.create_physical_expr(f, &df_schema))
            .transpose()?;
        let below = match (callers, &row_filter) {
            (Some(callers), Some(row_filter)) => Some(binary(
                callers,
                Operator::And,
                Arc::clone(row_filter),
                &input_schema,
            )?),
            (callers, _) => callers,
        };
        let input: Arc<dyn ExecutionPlan> = match below {
            Some(predicate) => Arc::new(FilterExec::try_new(predicate, input)?),
            None => input,
        };
        // The barrier applies the row filter unless the filter right below
        // it holds it, so hiding rows never depends on what the source or
        // the optimizer did with it further down.
        let mut exprs: Vec<Arc<dyn PhysicalExpr>> = Vec::with_capacity(wanted.len());
        for &position in wanted {
            let (index, view) = &self.columns[position];
            let expr = match view {
                ColumnView::Masked { expr, .. } => {
                    state.create_physical_expr(expr.clone(), &df_schema)?
                }
                _ => {
                    let name = base.field(*index).name();
                    Arc::new(ColumnExpr::new(name, input_schema.index_of(name)?)) as _
                }
            };
            exprs.push(expr);
        }
        let output = Arc::new(Schema::new(
            wanted
                .iter()
                .map(|&p| self.schema.field(p).clone())
                .collect::<Vec<_>>(),
        ));
        Ok(Arc::new(PolicyExec::new(
            self.product.clone(),
            input,
            row_filter,
            exprs,
            output,
        )))
    }
}

/// The expression with its columns unqualified, as the scan's schema names them.
pub(crate) fn unqualified(expr: &Expr) -> Expr {
    expr.clone()
        .transform(|e| match e {
            Expr::Column(column) if column.relation.is_some() => Ok(Transformed::yes(
                Expr::Column(datafusion::common::Column::new_unqualified(column.name)),
            )),
            other => Ok(Transformed::no(other)),
        })
        .map(|t| t.data)
        .unwrap_or_else(|_| expr.clone())
}
