"""The Trainer's live view in the scene: a loss table (one row per logged step) drawn by a plot chart."""
from __future__ import annotations

from typing import Sequence

import slicer
import vtk

TABLE_NAME = "AnatomicalEmbedding training losses"
CHART_NAME = "AnatomicalEmbedding training"
#: Series colours, one per loss term in order (the total loss first, in black).
SERIES_COLORS = [(0.1, 0.1, 0.1), (0.85, 0.2, 0.2), (0.2, 0.45, 0.85), (0.2, 0.65, 0.3), (0.8, 0.5, 0.1),
                 (0.55, 0.3, 0.7)]


def getTableNode(scene=None):
    scene = scene or slicer.mrmlScene
    node = scene.GetFirstNodeByName(TABLE_NAME)
    if node is None or not node.IsA("vtkMRMLTableNode"):
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", TABLE_NAME)
    # Column names in the table view's header ("lock first row"): otherwise qMRMLTableModel shows them as an
    # editable first row and every logged step one row below its index. Set on a table from a saved scene too.
    if hasattr(node, "SetUseColumnTitleAsColumnHeader"):
        node.SetUseColumnTitleAsColumnHeader(True)
    else:  # Slicer before 5.6 names it after the column name
        node.SetUseColumnNameAsColumnHeader(True)
    return node


def updateTable(history: Sequence[dict], scene=None):
    """Rewrite the loss table (column "step", "loss" and one per term) and the chart's series."""
    tableNode = getTableNode(scene)
    columns = ["step", "loss"]
    for rec in history:
        columns += [k for k in rec if k not in columns and k != "epoch"]
    table = vtk.vtkTable()
    for name in columns:
        arr = vtk.vtkDoubleArray()
        arr.SetName(name)
        arr.SetNumberOfTuples(len(history))
        for row, rec in enumerate(history):
            arr.SetValue(row, float(rec.get(name, float("nan"))))  # a term logged only later: NaN before
        table.AddColumn(arr)
    tableNode.SetAndObserveTable(table)
    updateChart(tableNode, columns[1:], scene)
    return tableNode


def updateChart(tableNode, terms: list, scene=None):
    scene = scene or slicer.mrmlScene
    chart = scene.GetFirstNodeByName(CHART_NAME)
    if chart is None or not chart.IsA("vtkMRMLPlotChartNode"):
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", CHART_NAME)
        chart.SetTitle("Training loss")
        chart.SetXAxisTitle("step")
        chart.SetYAxisTitle("loss")
    have = {}
    for i in range(chart.GetNumberOfPlotSeriesNodes()):
        series = chart.GetNthPlotSeriesNode(i)
        if series is not None:
            have[series.GetYColumnName()] = series
    for n, term in enumerate(terms):
        series = have.get(term)
        if series is None:
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{CHART_NAME} {term}")
            series.SetXColumnName("step")
            series.SetYColumnName(term)
            series.SetPlotType(series.PlotTypeScatter)  # scatter with lines: x values are steps
            series.SetMarkerStyle(series.MarkerStyleNone)
            series.SetColor(*SERIES_COLORS[n % len(SERIES_COLORS)])
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        series.SetAndObserveTableNodeID(tableNode.GetID())
    return chart


def showChart() -> None:
    """Show the loss chart in the layout (Slicer application only)."""
    chart = slicer.mrmlScene.GetFirstNodeByName(CHART_NAME)
    if chart is None:
        chart = updateChart(getTableNode(), ["loss"])
    slicer.modules.plots.logic().ShowChartInLayout(chart)
