// deeplabv2 evaluation report: per-image chart, worst/best gallery and the class filter.
// Shipped inside the package and inlined into index.html; it fetches nothing.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const images = data.images || [];
  if (!images.length) return;
  const select = document.getElementById("class-filter");
  data.classes.forEach(function (name, c) {
    const opt = document.createElement("option");
    opt.value = String(c);
    opt.textContent = name;
    select.appendChild(opt);
  });

  function pct(x) { return x === null || x === undefined ? "-" : (100 * x).toFixed(1) + "%"; }

  // [{entry, score}] sorted worst first: image mIoU, or one class's IoU in the images holding it
  function ranking() {
    const c = select.value === "" ? null : Number(select.value);
    const rows = [];
    images.forEach(function (e) {
      const score = c === null ? e.miou : e.iou[c];
      if (score !== null && score !== undefined) rows.push({ entry: e, score: score });
    });
    rows.sort(function (a, b) { return a.score - b.score || (a.entry.name < b.entry.name ? -1 : 1); });
    return { rows: rows, cls: c };
  }

  function chart(rows, cls) {
    const box = document.getElementById("image-chart");
    const w = 900, h = 160, n = Math.max(rows.length, 1), bw = w / n;
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", w + 40); svg.setAttribute("height", h + 30);
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", "per-image score, sorted");
    [0, 0.5, 1].forEach(function (t) {
      const y = h - t * h + 8;
      const line = document.createElementNS(ns, "line");
      line.setAttribute("x1", 30); line.setAttribute("x2", w + 30);
      line.setAttribute("y1", y); line.setAttribute("y2", y);
      line.setAttribute("stroke", "#ddd");
      svg.appendChild(line);
      const text = document.createElementNS(ns, "text");
      text.setAttribute("x", 0); text.setAttribute("y", y + 4);
      text.setAttribute("font-size", "10"); text.textContent = (100 * t) + "%";
      svg.appendChild(text);
    });
    rows.forEach(function (r, i) {
      const rect = document.createElementNS(ns, "rect");
      const bh = Math.max(r.score * h, 0.5);
      rect.setAttribute("x", 30 + i * bw); rect.setAttribute("width", Math.max(bw - (bw > 3 ? 1 : 0), 0.5));
      rect.setAttribute("y", h - bh + 8); rect.setAttribute("height", bh);
      const title = document.createElementNS(ns, "title");
      title.textContent = r.entry.name + ": " + pct(r.score);
      rect.appendChild(title);
      svg.appendChild(rect);
    });
    box.replaceChildren(svg);
    document.getElementById("filter-count").textContent = rows.length + " images" +
      (cls === null ? "" : " with " + data.classes[cls] + " in ground truth or prediction");
  }

  function panel(src, label, pixelated) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = src; img.alt = label; img.loading = "lazy";
    if (pixelated) img.className = "labels";
    const cap = document.createElement("figcaption");
    cap.textContent = label;
    fig.appendChild(img); fig.appendChild(cap);
    return fig;
  }

  function gallery(id, rows, cls) {
    const box = document.getElementById(id);
    box.replaceChildren();
    rows.forEach(function (r) {
      const e = r.entry, t = e.thumbs;
      const item = document.createElement("div");
      item.className = "item";
      item.dataset.name = e.name;
      item.dataset.score = String(r.score);
      const cap = document.createElement("div");
      cap.className = "caption";
      let text = e.name + " \u2014 " + (cls === null ? "mIoU " : data.classes[cls] + " IoU ");
      cap.textContent = text;
      const b = document.createElement("b");
      b.textContent = pct(r.score);
      cap.appendChild(b);
      if (cls !== null) cap.appendChild(document.createTextNode(" (image mIoU " + pct(e.miou) + ")"));
      if (e.miou_before_crf !== undefined)
        cap.appendChild(document.createTextNode(", mIoU before CRF " + pct(e.miou_before_crf)));
      const panels = document.createElement("div");
      panels.className = "panels";
      panels.appendChild(panel(t.image, "image", false));
      panels.appendChild(panel(t.gt, "ground truth", true));
      if (t.before_crf) panels.appendChild(panel(t.before_crf, "before CRF", true));
      panels.appendChild(panel(t.pred, t.before_crf ? "after CRF" : "prediction", true));
      panels.appendChild(panel(t.error, "error map", true));
      item.appendChild(cap); item.appendChild(panels);
      box.appendChild(item);
    });
  }

  function render() {
    const r = ranking(), k = data.gallery_size;
    chart(r.rows, r.cls);
    gallery("worst", r.rows.slice(0, k), r.cls);
    gallery("best", r.rows.slice(Math.max(r.rows.length - k, 0)).reverse(), r.cls);
    document.body.dataset.ready = "1";
  }
  select.addEventListener("change", render);
  // clicking a class in the IoU chart or the class table ranks the images by that class
  document.querySelectorAll("#iou-chart rect.bar[data-class], #class-table tr[data-class]")
    .forEach(function (el) {
      el.style.cursor = "pointer";
      el.addEventListener("click", function () {
        select.value = String(data.classes.indexOf(el.dataset.class));
        render();
        document.getElementById("images").scrollIntoView();
      });
    });
  render();
})();
