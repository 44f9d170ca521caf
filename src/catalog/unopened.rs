//! A file product whose store did not answer when the mesh loaded.
//!
//! A domain's bucket being down while the gateway starts (or reloads) must
//! not make its products vanish: a product that declares its columns is
//! published from them, its queries fail as any query of a store that is
//! down does (UNAVAILABLE, naming the product), and the first query after
//! the store is back opens it, checking its files against the contract as
//! the load would have.

use std::sync::Arc;

use arrow::datatypes::{Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{CastExpr, Column};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::projection::{ProjectionExec, ProjectionExpr};

use super::files::{FileProduct, OpenError, open_files};

#[derive(Debug)]
pub(super) struct UnopenedFiles {
    product: FileProduct,
    /// The declared columns: what the product publishes until it opens.
    schema: SchemaRef,
    opened: tokio::sync::OnceCell<Arc<dyn TableProvider>>,
}

impl UnopenedFiles {
    /// The product, to be opened at its first query, when its declared
    /// columns give its schema; otherwise why that cannot be (appended to
    /// the reason its store gave).
    pub(super) fn publish(
        product: &FileProduct,
        store_error: &str,
    ) -> Result<Arc<dyn TableProvider>, String> {
        if product.declared.is_empty() {
            return Err(String::new());
        }
        let undeclared: Vec<&str> = product
            .policy_columns
            .iter()
            .filter(|c| c.read_by.is_some())
            .map(|c| c.name.as_str())
            .collect();
        if !undeclared.is_empty() {
            return Err(format!(
                " (its policies read {}, which are not declared: declare them, denied, to \
                 publish the product while its store is down)",
                undeclared.join(", ")
            ));
        }
        tracing::warn!(
            url = %product.url,
            error = %store_error,
            "store unreachable; product published from its declared columns"
        );
        let schema = Arc::new(Schema::new(
            product
                .declared
                .iter()
                .map(|c| Field::new(&c.name, c.data_type.clone(), true))
                .collect::<Vec<_>>(),
        ));
        let mut product = product.clone();
        // Only policies need the columns it does not publish.
        product.policy_columns.clear();
        Ok(Arc::new(Self {
            product,
            schema,
            opened: tokio::sync::OnceCell::new(),
        }))
    }

    async fn opened(&self, state: &dyn Session) -> datafusion::error::Result<&dyn TableProvider> {
        let table = self
            .opened
            .get_or_try_init(|| async {
                let table = open_files(state, &self.product)
                    .await
                    .map_err(|e| match e {
                        OpenError::Unreachable(error) => error,
                        OpenError::Refused(reason) => {
                            DataFusionError::IoError(std::io::Error::other(format!(
                                "the product's files break its declared columns: {reason}"
                            )))
                        }
                    })?;
                let found = table.schema();
                let same_names = found.fields().len() == self.schema.fields().len()
                    && found
                        .fields()
                        .iter()
                        .zip(self.schema.fields())
                        .all(|(a, b)| a.name() == b.name());
                if !same_names {
                    return Err(DataFusionError::Internal(format!(
                        "the opened product's columns ({found}) are not its declared ones ({})",
                        self.schema
                    )));
                }
                Ok(table)
            })
            .await?;
        Ok(table.as_ref())
    }
}

#[async_trait]
impl TableProvider for UnopenedFiles {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        // Filters are offered to the files once they open; the rows they
        // return are filtered again above.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let table = self.opened(state).await?;
        let plan = table.scan(state, projection, filters, limit).await?;
        let wanted = match projection {
            Some(projection) => Arc::new(self.schema.project(projection)?),
            None => Arc::clone(&self.schema),
        };
        // The files may store a declared type in another form (a string
        // as a view): the plan reads the declared types.
        let found = plan.schema();
        if found
            .fields()
            .iter()
            .zip(wanted.fields())
            .all(|(a, b)| a.data_type() == b.data_type())
        {
            return Ok(plan);
        }
        let exprs: Vec<ProjectionExpr> = wanted
            .fields()
            .iter()
            .zip(found.fields())
            .enumerate()
            .map(|(index, (field, stored))| {
                let column: Arc<dyn PhysicalExpr> = Arc::new(Column::new(stored.name(), index));
                let expr: Arc<dyn PhysicalExpr> = if stored.data_type() == field.data_type() {
                    column
                } else {
                    Arc::new(CastExpr::new(column, field.data_type().clone(), None))
                };
                ProjectionExpr::new(expr, field.name().clone())
            })
            .collect();
        Ok(Arc::new(ProjectionExec::try_new(exprs, plan)?))
    }
}
