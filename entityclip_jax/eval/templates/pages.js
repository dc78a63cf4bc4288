// Every thumbnail is stored once, in #thumbnails (id -> data: URI); each <img data-thumb=ID> takes it from there.
const thumbnails = JSON.parse((document.getElementById("thumbnails") || {}).textContent || "{}");
for (const img of document.querySelectorAll("img[data-thumb]")) {
  const uri = thumbnails[img.dataset.thumb];
  if (uri) {
    img.src = uri;
  } else {
    const missing = document.createElement("span");
    missing.className = "missing";
    missing.textContent = "no thumbnail";
    img.replaceWith(missing);
  }
}

// Each <section class="queries"> sorts and filters its own table rows (data-* attributes on each row).
for (const section of document.querySelectorAll("section.queries")) {
  const body = section.querySelector("table.query-rows > tbody");
  const rows = Array.from(body.rows);
  const value = (selector, fallback) => {
    const control = section.querySelector(selector);
    return control && control.value !== "" ? control.value : fallback;
  };
  const update = () => {
    const [key, direction] = value("select.sort", "order:asc").split(":");
    const sign = direction === "desc" ? -1 : 1;
    const low = Number(value("input.min-rank", 1));
    const high = Number(value("input.max-rank", Infinity));
    const kind = value("select.kind", "all");
    rows.sort((a, b) => sign * (Number(a.dataset[key]) - Number(b.dataset[key]))
                        || Number(a.dataset.order) - Number(b.dataset.order));
    let shown = 0;
    for (const row of rows) {
      const rank = Number(row.dataset.rank);
      row.hidden = !(rank >= low && rank <= high && (kind === "all" || row.dataset.kind === kind));
      shown += row.hidden ? 0 : 1;
      body.appendChild(row);
    }
    section.querySelector(".shown").textContent = shown;
  };
  for (const control of section.querySelectorAll("select, input")) {
    control.addEventListener("input", update);
    control.addEventListener("change", update);
  }
  update();
}
