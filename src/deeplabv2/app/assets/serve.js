// deeplabv2 serve: upload images, show the prediction as an overlay. Shipped in the package.
(function () {
  "use strict";
  const $ = function (id) { return document.getElementById(id); };
  let model = null, current = null;
  const results = [];  // {file, name, data, photoUrl}

  function setState(state, message, isError) {
    document.body.dataset.state = state;
    $("status").textContent = message || "";
    $("status").className = isError ? "error" : "";
  }

  fetch("api/model").then(function (r) { return r.json(); }).then(function (info) {
    model = info;
    $("model-name").textContent = info.checkpoint + " \u2014 " + info.num_classes + " classes";
    $("download-ids").hidden = !info.cityscapes_label_ids;
  });

  function query(format) {
    const q = new URLSearchParams({ format: format });
    if ($("crf").checked) q.set("crf", "1");
    if ($("multiscale").checked) q.set("multiscale", "1");
    return q;
  }

  async function post(file, format) {
    const r = await fetch("api/predict?" + query(format).toString(), {
      method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" }
    });
    if (!r.ok) {
      let why = r.status + " " + r.statusText;
      try { why = r.status + ": " + (await r.json()).error; } catch (e) { /* not JSON */ }
      throw new Error(why);
    }
    return r;
  }

  async function run(entry) {
    setState("busy", "segmenting " + entry.name + " \u2026");
    try {
      const q = query("json"); q.set("include", "png");
      const r = await fetch("api/predict?" + q.toString(), {
        method: "POST", body: entry.file,
        headers: { "Content-Type": entry.file.type || "application/octet-stream" }
      });
      const body = await r.json().catch(function () { return { error: r.statusText }; });
      if (!r.ok) throw new Error(r.status + ": " + body.error);
      entry.data = body;
      show(entry);
      setState("done", entry.name + ": " + body.width + "x" + body.height + ", " + body.seconds.toFixed(2) + " s");
    } catch (err) {
      setState("error", entry.name + " \u2014 " + err.message, true);
    }
  }

  function show(entry) {
    current = entry;
    const d = entry.data;
    $("result").hidden = false;
    $("photo").src = entry.photoUrl;
    const png = "data:image/png;base64," + d.label_png;
    $("overlay").src = png;
    $("download-png").href = png;
    $("download-png").download = entry.name.replace(/\.[^.]*$/, "") + "_labels.png";
    const table = $("legend");
    table.replaceChildren();
    d.classes.forEach(function (c) {
      const tr = document.createElement("tr");
      tr.dataset.class = c.name;
      const sw = document.createElement("td");
      const span = document.createElement("span");
      span.className = "swatch"; span.style.background = c.colour;
      sw.appendChild(span);
      const name = document.createElement("td"); name.textContent = c.name;
      const share = document.createElement("td"); share.className = "share";
      share.textContent = (100 * c.share).toFixed(1) + "%";
      tr.appendChild(sw); tr.appendChild(name); tr.appendChild(share);
      table.appendChild(tr);
    });
    $("timing").textContent = "inference " + d.seconds.toFixed(2) + " s" +
      ($("crf").checked ? ", CRF" : "") + ($("multiscale").checked ? ", multi-scale" : "");
    document.querySelectorAll("#files button").forEach(function (b) {
      b.className = b.dataset.index === String(results.indexOf(entry)) ? "current" : "";
    });
  }

  async function add(files) {
    for (const file of files) {
      const entry = { file: file, name: file.name || "image", photoUrl: URL.createObjectURL(file) };
      results.push(entry);
      const b = document.createElement("button");
      b.textContent = entry.name; b.dataset.index = String(results.length - 1);
      b.addEventListener("click", function () { entry.data ? show(entry) : run(entry); });
      $("files").appendChild(b);
      await run(entry);
    }
  }

  $("file").addEventListener("change", function (e) { add(Array.from(e.target.files)); e.target.value = ""; });
  const drop = $("drop");
  ["dragenter", "dragover"].forEach(function (t) {
    drop.addEventListener(t, function (e) { e.preventDefault(); drop.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (t) {
    drop.addEventListener(t, function (e) { e.preventDefault(); drop.classList.remove("over"); });
  });
  drop.addEventListener("drop", function (e) { add(Array.from(e.dataTransfer.files)); });

  function opacity() {
    $("overlay").style.opacity = $("opacity").value / 100;
    $("opacity-value").textContent = $("opacity").value + "%";
  }
  $("opacity").addEventListener("input", opacity);
  opacity();
  ["crf", "multiscale"].forEach(function (id) {
    $(id).addEventListener("change", function () { if (current) run(current); });
  });

  $("download-ids").addEventListener("click", async function (e) {
    e.preventDefault();
    if (!current) return;
    try {
      const blob = await (await post(current.file, "labelids")).blob();
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = current.name.replace(/\.[^.]*$/, "") + "_labelIds.png";
      document.body.appendChild(a); a.click(); a.remove();
    } catch (err) {
      setState("error", err.message, true);
    }
  });
})();
