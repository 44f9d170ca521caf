//! The policy barrier: one physical operator that applies a product's row
//! filter and masks to the raw rows of its input. It accepts no filter,
//! limit or projection from above (the defaults of `ExecutionPlan`), reports
//! unknown statistics, and is shown in EXPLAIN as a leaf, so nothing the
//! caller writes runs on, or reports about, rows it hides.

use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, RecordBatchOptions};
use arrow::compute::{filter_record_batch, prep_null_mask_filter};
use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties,
};
use futures::StreamExt;

/// Applies a row filter, then computes the caller's columns.
#[derive(Debug)]
pub struct PolicyExec {
    product: String,
    input: Arc<dyn ExecutionPlan>,
    row_filter: Option<Arc<dyn PhysicalExpr>>,
    /// One expression per output column, over the input's columns.
    columns: Vec<Arc<dyn PhysicalExpr>>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl PolicyExec {
    pub fn new(
        product: String,
        input: Arc<dyn ExecutionPlan>,
        row_filter: Option<Arc<dyn PhysicalExpr>>,
        columns: Vec<Arc<dyn PhysicalExpr>>,
        schema: SchemaRef,
    ) -> Self {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            input.output_partitioning().clone(),
            input.pipeline_behavior(),
            input.boundedness(),
        );
        Self {
            product,
            input,
            row_filter,
            columns,
            schema,
            properties: Arc::new(properties),
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// The product this barrier protects.
    pub fn product(&self) -> &str {
        &self.product
    }
}

impl DisplayAs for PolicyExec {
    fn fmt_as(&self, _format: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The policy's expressions are not shown: they may hold other
        // callers' conditions or values the caller must not see.
        write!(f, "PolicyExec: product={}", self.product)
    }
}

impl ExecutionPlan for PolicyExec {
    fn name(&self) -> &str {
        "PolicyExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        datafusion::physical_plan::execution_plan::apply_expression_roots(
            self.row_filter.iter().chain(self.columns.iter()),
            f,
        )
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal(
                "PolicyExec takes exactly one input".into(),
            ));
        }
        Ok(Arc::new(Self::new(
            self.product.clone(),
            children.swap_remove(0),
            self.row_filter.clone(),
            self.columns.clone(),
            Arc::clone(&self.schema),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let row_filter = self.row_filter.clone();
        let columns = self.columns.clone();
        let schema = Arc::clone(&self.schema);
        let metrics = BaselineMetrics::new(&self.metrics, partition);
        let output = Arc::clone(&schema);
        let stream = input.filter_map(move |batch| {
            let result = batch.and_then(|batch| {
                let timer = metrics.elapsed_compute().timer();
                let result = apply(&batch, row_filter.as_ref(), &columns, &output);
                timer.done();
                result
            });
            let keep = match &result {
                Ok(batch) => {
                    metrics.record_output(batch.num_rows());
                    batch.num_rows() > 0
                }
                Err(_) => true,
            };
            futures::future::ready(keep.then_some(result))
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

fn apply(
    batch: &RecordBatch,
    row_filter: Option<&Arc<dyn PhysicalExpr>>,
    columns: &[Arc<dyn PhysicalExpr>],
    schema: &SchemaRef,
) -> Result<RecordBatch> {
    let visible = match row_filter {
        Some(predicate) => {
            let mask = predicate.evaluate(batch)?.into_array(batch.num_rows())?;
            let mask = mask
                .as_any()
                .downcast_ref::<BooleanArray>()
                .ok_or_else(|| DataFusionError::Internal("row filter is not boolean".into()))?;
            // NULL hides the row, as false does.
            let mask = if mask.null_count() > 0 {
                prep_null_mask_filter(mask)
            } else {
                mask.clone()
            };
            filter_record_batch(batch, &mask)?
        }
        None => batch.clone(),
    };
    let arrays = columns
        .iter()
        .map(|expr| expr.evaluate(&visible)?.into_array(visible.num_rows()))
        .collect::<Result<Vec<ArrayRef>>>()?;
    Ok(RecordBatch::try_new_with_options(
        Arc::clone(schema),
        arrays,
        &RecordBatchOptions::new().with_row_count(Some(visible.num_rows())),
    )?)
}
