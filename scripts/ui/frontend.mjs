// Drive ComfyUI's real web frontend in headless Debian Chromium (playwright-core; no browser download).
//
//   NODE_PATH=<node_modules> node frontend.mjs JOB.json
//
// JOB.json: {"url": "http://127.0.0.1:PORT", "mode": "build" | "check", "items": [...], "screenshot_dir": "..."}
//  build: item {"name", "api": {...}, "notes": ["..."], "ui_out": path, "thumb_out": path}
//         loads the API graph (app.loadApiJson), adds Note nodes with the explanations, arranges the graph,
//         writes the UI-format workflow (app.graph.serialize()) and a JPEG thumbnail of the canvas.
//  check: item {"name", "ui": path}
//         loads the UI workflow as a user would (app.loadGraphData), reports node types the frontend does not know,
//         page errors, the frontend's own API conversion (app.graphToPrompt()), and writes a PNG screenshot.
// Prints one JSON line: {"results": [...], "page_errors": [...]}.
import { createRequire } from 'module';
import fs from 'fs';
import path from 'path';

const require = createRequire(import.meta.url);
const { chromium } = require('playwright-core');
const job = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const base = job.url;

// A clean canvas: tutorial done (else the template browser covers it), no minimap.
await fetch(`${base}/api/settings/Comfy.TutorialCompleted`, { method: 'POST', body: 'true' });
await fetch(`${base}/api/settings/Comfy.Minimap.Visible`, { method: 'POST', body: 'false' });
// draw node text even when a whole workflow is zoomed out to fit the screenshot
await fetch(`${base}/api/settings/LiteGraph.Canvas.MinFontSizeForLOD`, { method: 'POST', body: '1' });
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium', headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
const pageErrors = [];
page.on('pageerror', (e) => pageErrors.push(String(e)));
await page.goto(base + '/');
await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, { timeout: 90000 });
await page.waitForTimeout(1500);

async function closeDialogs() {
  await page.keyboard.press('Escape').catch(() => {});
  await page.evaluate(() => {
    document.querySelectorAll('.p-dialog-mask, .comfy-modal').forEach((el) => el.remove());
    // the "Introducing Nodes 2.0" announcement bar over the canvas
    for (const el of document.querySelectorAll('div')) {
      if (el.textContent.trim().startsWith('Introducing Nodes 2.0') && el.querySelectorAll('div').length < 8) {
        el.remove();
        break;
      }
    }
  });
}

// Show the whole graph: scale and offset the canvas to the bounding box of every node.
async function fitAll() {
  await page.evaluate(() => {
    const app = window.app;
    const nodes = app.graph._nodes;
    if (!nodes.length) return;
    const x0 = Math.min(...nodes.map((n) => n.pos[0])), y0 = Math.min(...nodes.map((n) => n.pos[1] - 30));
    const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
    const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
    const rect = app.canvas.canvas.getBoundingClientRect();
    const scale = Math.min(1.0, (rect.width - 140) / (x1 - x0), (rect.height - 180) / (y1 - y0));
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [-x0 + 70 / scale, -y0 + 130 / scale];
    app.graph.setDirtyCanvas(true, true);
  });
  await page.waitForTimeout(500);
}

const results = [];
for (const item of job.items) {
  const errorsBefore = pageErrors.length;
  if (job.mode === 'build') {
    const ui = await page.evaluate(async ({ api, notes, name }) => {
      const app = window.app;
      app.graph.clear();
      await app.loadApiJson(api, name + '.json');
      // Layered layout: a node's column is one more than the deepest node feeding it; columns left to right.
      const nodes = app.graph._nodes;
      const depth = new Map();
      const depthOf = (node) => {
        if (depth.has(node.id)) return depth.get(node.id);
        depth.set(node.id, 0);
        let d = 0;
        for (const input of node.inputs || []) {
          const link = input.link != null ? app.graph.links[input.link] : null;
          if (link) d = Math.max(d, depthOf(app.graph.getNodeById(link.origin_id)) + 1);
        }
        depth.set(node.id, d);
        return d;
      };
      const columns = [];
      for (const node of nodes) (columns[depthOf(node)] ||= []).push(node);
      let x = 0;
      for (const column of columns.filter(Boolean)) {
        let y = 0;
        for (const node of column) {
          node.pos = [x, y];
          y += node.size[1] + 70;
        }
        x += Math.max(...column.map((n) => n.size[0])) + 60;
      }
      // Notes: one Note node per explanation, stacked left of the graph.
      let minX = 0;
      let y = 0;
      for (const text of notes) {
        const note = window.LiteGraph.createNode('Note');
        note.widgets[0].value = text;
        note.size = [380, Math.max(120, 24 + 18 * Math.ceil(text.length / 52))];
        note.pos = [minX - 420, y];
        y += note.size[1] + 30;
        app.graph.add(note);
      }
      // Example workflows reproduce: seeds stay fixed after a run instead of ComfyUI's default "randomize".
      for (const node of nodes) {
        for (const w of node.widgets || []) {
          if (w.name === 'control_after_generate') w.value = 'fixed';
        }
      }
      app.graph.setDirtyCanvas(true, true);
      return app.graph.serialize();
    }, { api: item.api, notes: item.notes || [], name: item.name });
    fs.mkdirSync(path.dirname(item.ui_out), { recursive: true });
    fs.writeFileSync(item.ui_out + '.tmp', JSON.stringify(ui, null, 2) + '\n');
    fs.renameSync(item.ui_out + '.tmp', item.ui_out);
    await closeDialogs();
    await fitAll();
    if (item.thumb_out) {
      await page.screenshot({ path: item.thumb_out, type: 'jpeg', quality: 70 });
    }
    results.push({ name: item.name, nodes: ui.nodes.length, links: ui.links.length });
  } else {
    const ui = JSON.parse(fs.readFileSync(item.ui, 'utf8'));
    const out = await page.evaluate(async ({ ui, name }) => {
      const app = window.app;
      const known = new Set(Object.keys(window.LiteGraph.registered_node_types));
      const missing = [...new Set(ui.nodes.map((n) => n.type).filter((t) => !known.has(t)))];
      await app.loadGraphData(ui, true, true, name);
      const prompt = await app.graphToPrompt();
      return { missing, prompt: prompt.output, node_count: app.graph._nodes.length };
    }, { ui, name: item.name });
    await closeDialogs();
    await fitAll();
    if (job.screenshot_dir) {
      fs.mkdirSync(job.screenshot_dir, { recursive: true });
      await page.screenshot({ path: path.join(job.screenshot_dir, item.name + '.png') });
    }
    results.push({ name: item.name, ...out, page_errors: pageErrors.slice(errorsBefore) });
  }
}
await browser.close();
console.log(JSON.stringify({ results, page_errors: pageErrors }));
