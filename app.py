"""Model Interpret Explorer: the app's frame. Navigation, the shared sidebar, then the chosen page."""

from pathlib import Path

import streamlit as st

from explorer_ui import sidebar

# Pages live in app_pages/, not pages/: Streamlit treats a pages/ folder beside the entry point as its
# legacy multipage mode on a process's first run (and AppTest on every rerun), which would run a
# deep-linked page without this frame and its sidebar.
PAGES = Path(__file__).resolve().parent / "app_pages"

st.set_page_config(page_title="Model Interpret Explorer", page_icon="🔎", layout="wide")

pages = [
    st.Page(PAGES / "generate.py", title="Generate", icon="✍️", default=True),
    st.Page(PAGES / "viewer.py", title="Trace viewer", icon="📂"),
    st.Page(PAGES / "compare.py", title="Compare models", icon="⚖️"),
    st.Page(PAGES / "heads.py", title="Heads", icon="🧩"),
]
st.session_state["config"] = sidebar.render()
pg = st.navigation(pages)
pg.run()
