// Crucible: show the text a node reports (dataset report, caption preview, step plan, train summary) right under
// the node, in a read-only box. Works on ComfyUI front ends from 2024 on (they serve this file from WEB_DIRECTORY).
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const TEXT_NODES = new Set([
  "CrucibleDataset", "CrucibleCaptionPreview", "CrucibleStepPlan", "CrucibleTrain",
]);
const WIDGET = "crucible_report";

function showText(node, lines) {
  const text = Array.isArray(lines) ? lines.join("\n") : String(lines ?? "");
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.inputEl.readOnly = true;
    widget.inputEl.style.opacity = 0.85;
    widget.serialize = false; // never stored in workflows: widget values stay positional and append-only
  }
  widget.value = text;
  requestAnimationFrame(() => {
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
    app.graph.setDirtyCanvas(true, false);
  });
}

app.registerExtension({
  name: "crucible.reportText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TEXT_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text) showText(this, message.text);
    };
  },
});
