// The waiting page in every bundled language, in a real headless Chromium: the browser's
// language (Accept-Language) picks the page's, right-to-left languages are laid out right to
// left, the live script words the wait in the same language, and a screenshot of each page
// is kept.
//
//   node tests/browser/languages.mjs http://127.0.0.1:PORT EXPECTED.json SCREENSHOT_DIR
//
// EXPECTED.json maps each language code to {title, rtl, eta: [its wait strings]}. The gate
// must guard /checkout with max_active = 1 in front of the demo shop.
import { readFileSync } from "node:fs";
import { run, step, timeout } from "./launch.mjs";

const [base, expectedFile, shots] = process.argv.slice(2);
const expected = JSON.parse(readFileSync(expectedFile, "utf8"));

// What a page shows: its language, direction, heading, and the wait as the script words it.
async function visit(browser, headers, locale) {
  const context = await browser.newContext({ viewport: { width: 360, height: 720 }, locale, extraHTTPHeaders: headers });
  const page = await context.newPage();
  await page.goto(`${base}/checkout`);
  await page.waitForFunction(() => document.body.getAttribute("data-feed") === "open", null, { timeout });
  // The feed's first message is the place: the script has worded the wait by now.
  await page.waitForFunction(() => document.getElementById("eta").textContent.trim() !== "", null, { timeout });
  const seen = await page.evaluate(() => ({
    lang: document.documentElement.lang,
    dir: getComputedStyle(document.body).direction,
    title: document.getElementById("title").textContent.trim(),
    eta: document.getElementById("eta").textContent.trim(),
    tab: document.title,
  }));
  return { page, context, seen };
}

await run(async (browser) => {
  const first = await (await browser.newContext()).newPage();
  await first.goto(`${base}/checkout`);
  await first.getByRole("heading", { name: "Checkout" }).waitFor({ timeout });

  for (const [code, want] of Object.entries(expected)) {
    const { page, context, seen } = await visit(browser, { "Accept-Language": `${code}-XX, ${code};q=0.9, en;q=0.1` }, code);
    const problems = [];
    if (seen.lang !== code) problems.push(`lang ${seen.lang}`);
    if (seen.dir !== (want.rtl ? "rtl" : "ltr")) problems.push(`direction ${seen.dir}`);
    if (seen.title !== want.title) problems.push(`heading ${JSON.stringify(seen.title)}`);
    if (!want.eta.some((pattern) => new RegExp(`^${pattern}$`).test(seen.eta))) problems.push(`wait ${JSON.stringify(seen.eta)}`);
    if (problems.length) throw new Error(`${code}: ${problems.join(", ")}`);
    await page.screenshot({ path: `${shots}/waiting-page-${code}.png`, fullPage: true });
    await context.close();
    step(`${code}: ${seen.title} | ${seen.eta} | ${seen.dir}`);
  }

  // Quality values decide; what is not bundled is passed over.
  const { context, seen } = await visit(browser, { "Accept-Language": "xx, de;q=0.5, fr;q=0.9" });
  if (seen.lang !== "fr") throw new Error(`xx, de;q=0.5, fr;q=0.9 gave ${seen.lang}`);
  await context.close();
  step("xx, de;q=0.5, fr;q=0.9 gives fr");
});
